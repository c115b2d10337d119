"""`lorabox tui`: a Textual app that shows the box live and acts on it, over the admin API only.

It imports nothing from `appliance` but the admin client (`appliance.api.adminclient`).
"""
