"""Small modal questions: pick one of a list, give a percentage, confirm a change that cannot be undone."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList
from textual.widgets.option_list import Option

DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: 64; height: auto; max-height: 80%; padding: 1 2;
    border: thick $primary; background: $surface;
}}
{name} Label {{ width: 100%; margin-bottom: 1; }}
{name} .hint {{ color: $text-muted; margin: 1 0 0 0; }}
{name} Horizontal {{ height: auto; align-horizontal: right; }}
{name} Button {{ margin-left: 2; }}
"""


class ChoiceDialog(ModalScreen[str | None]):
    """One option out of a list; dismisses with its id, or None when cancelled."""

    DEFAULT_CSS = (
        DIALOG_CSS.format(name="ChoiceDialog") + "ChoiceDialog OptionList { height: auto; max-height: 16; }"
    )
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]]) -> None:
        super().__init__()
        self.title_text = title
        self.options = options

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield OptionList(*(Option(label, id=option_id) for option_id, label in self.options))
            yield Label("enter chooses · escape cancels", classes="hint")

    @on(OptionList.OptionSelected)
    def choose(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PercentDialog(ModalScreen[int | None]):
    """A whole percentage from 0 to 100."""

    DEFAULT_CSS = DIALOG_CSS.format(name="PercentDialog")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: int) -> None:
        super().__init__()
        self.title_text = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield Input(str(self.value), type="integer", max_length=3, id="percent")
            yield Label("0 to 100 · enter sets it · escape cancels", classes="hint", id="percent-hint")

    @on(Input.Submitted)
    def submit(self, event: Input.Submitted) -> None:
        try:
            percent = int(event.value)
        except ValueError:
            percent = -1
        if 0 <= percent <= 100:
            self.dismiss(percent)
        else:
            self.query_one("#percent-hint", Label).update("a whole number from 0 to 100, please")

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    """Yes or no; "no" has the focus, so a stray enter changes nothing."""

    DEFAULT_CSS = DIALOG_CSS.format(name="ConfirmDialog")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "answer(False)", "No"),
        Binding("y", "answer(True)", "Yes"),
    ]

    def __init__(self, question: str, yes: str) -> None:
        super().__init__()
        self.question = question
        self.yes = yes

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", variant="primary", id="no")
            yield Label("y confirms · n or escape cancels", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
