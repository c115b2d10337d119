"""OpenAI's Files API, per tenant: upload (multipart, streamed to disk), list, get, content, delete.

A tenant sees only its own files: another tenant's file id is the 404 of a file that does not
exist. Uploads are capped per file, per tenant and in lines (policy: file_max_bytes,
files_total_bytes, batch_max_lines); an upload past a cap is refused as it streams in."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import BodyPartReader, web

from ..batch.files import (
    FILE_ID,
    MAX_FILENAME_CHARS,
    PURPOSES,
    Caps,
    FileStore,
    StoredFile,
    UploadRefused,
    delete_file,
    get_file,
    insert_file,
    list_files,
    new_file_id,
    now,
    stored_bytes,
)
from .errors import APIError, bad_request
from .openai import authenticate
from .services import SERVICES

FILES = web.AppKey("files", FileStore)
MULTIPART_SLACK_BYTES = 64 << 10  # the multipart framing and the other fields, besides the file
MAX_FIELD_BYTES = 1024
MAX_LIST_LIMIT = 10_000


def no_such_file(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


def tenant_file(request: web.Request) -> tuple[str, StoredFile]:
    """The caller's tenant and the file the URL names (404 for none, or another tenant's)."""
    services = request.app[SERVICES]
    tenant = authenticate(request, services).tenant.name
    file_id = request.match_info["file_id"]
    stored = get_file(services.store, tenant, file_id) if FILE_ID.fullmatch(file_id) else None
    if stored is None:
        raise no_such_file(file_id)
    return tenant, stored


async def _field(part: BodyPartReader, name: str) -> str:
    raw = b""
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        raw += chunk
        if len(raw) > MAX_FIELD_BYTES:
            raise bad_request(f"The '{name}' field is longer than {MAX_FIELD_BYTES} bytes.", name)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise bad_request(f"The '{name}' field is not valid UTF-8.", name) from None


async def upload(request: web.Request) -> web.Response:
    services, files = request.app[SERVICES], request.app[FILES]
    tenant = authenticate(request, services).tenant.name
    policy = services.admission.policy_for(tenant)
    room = policy.files_total_bytes - stored_bytes(services.store, tenant) - files.uploading.get(tenant, 0)
    caps = Caps(policy.file_max_bytes, room, policy.batch_max_lines)
    if request.content_length is not None and request.content_length > (
        min(caps.file_bytes, max(room, 0)) + MULTIPART_SLACK_BYTES
    ):  # refused before a byte of it is read
        raise APIError(
            413,
            f"The upload is larger than this tenant may store: {caps.file_bytes} bytes a file, "
            f"{max(room, 0)} bytes left of its files' limit.",
            param="file",
            code="file_too_large",
        )
    if not request.content_type.startswith("multipart/"):
        raise bad_request("Send the file as multipart/form-data, with fields 'file' and 'purpose'.", "file")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise bad_request(f"The multipart body could not be read ({exc}).", "file") from exc
    purpose, stored = None, None
    file_id = new_file_id()
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise bad_request("Nested multipart bodies are not supported.", "file")
            if part.name == "purpose":
                purpose = await _field(part, "purpose")
            elif part.name == "file" and stored is None:
                filename = (part.filename or "upload.jsonl")[:MAX_FILENAME_CHARS]
                size, lines = await files.receive(tenant, file_id, part, caps)
                stored = StoredFile(file_id, tenant, filename, "", size, lines, now())
            else:
                await part.release()
    except UploadRefused as exc:
        raise APIError(exc.status, exc.message, param="file", code=exc.code) from exc
    except ValueError as exc:  # a broken multipart body
        await files.remove(tenant, file_id)
        raise bad_request(f"The multipart body could not be read ({exc}).", "file") from exc
    except BaseException:
        await files.remove(tenant, file_id)
        raise
    try:
        if stored is None:
            raise bad_request("The 'file' field is missing.", "file")
        if purpose not in PURPOSES:
            choices = ", ".join(PURPOSES)
            message = f"'purpose' must be one of {choices}, not {purpose!r}."
            raise bad_request(message, "purpose", "invalid_value")
        stored = StoredFile(**{**stored.__dict__, "purpose": purpose})
        await services.writer.call(insert_file, stored)
    except BaseException:
        await files.remove(tenant, file_id)
        raise
    return web.json_response(stored.openai())


async def list_(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    tenant = authenticate(request, services).tenant.name
    query = request.query
    try:
        limit = int(query.get("limit", MAX_LIST_LIMIT))
    except ValueError:
        raise bad_request("'limit' must be a whole number.", "limit") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_request(f"'limit' must be between 1 and {MAX_LIST_LIMIT}.", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'.", "order")
    page, more = list_files(
        services.store,
        tenant,
        purpose=query.get("purpose"),
        after=query.get("after"),
        limit=limit,
        newest_first=order == "desc",
    )
    return list_page([stored.openai() for stored in page], more)


def list_page(data: list[dict[str, Any]], more: bool) -> web.Response:
    """A page of a cursor-paginated list, as OpenAI's API answers one (files, batches)."""
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


async def retrieve(request: web.Request) -> web.Response:
    return web.json_response(tenant_file(request)[1].openai())


async def content(request: web.Request) -> web.FileResponse:
    tenant, stored = tenant_file(request)
    path = request.app[FILES].path(tenant, stored.id)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def delete(request: web.Request) -> web.Response:
    tenant, stored = tenant_file(request)
    services = request.app[SERVICES]
    if not await services.writer.call(delete_file, tenant, stored.id):
        raise no_such_file(stored.id)  # deleted by a request of its own since
    with contextlib.suppress(OSError):  # what is left is swept at the next start
        await request.app[FILES].remove(tenant, stored.id)
    return web.json_response({"id": stored.id, "object": "file", "deleted": True})


def add_routes(app: web.Application, files: FileStore) -> None:
    app[FILES] = files
    for prefix in ("", "/t/{tenant}"):  # as the generation routes (api/openai.py)
        app.router.add_post(f"{prefix}/v1/files", upload)
        app.router.add_get(f"{prefix}/v1/files", list_)
        app.router.add_get(f"{prefix}/v1/files/{{file_id}}", retrieve)
        app.router.add_get(f"{prefix}/v1/files/{{file_id}}/content", content)
        app.router.add_delete(f"{prefix}/v1/files/{{file_id}}", delete)
