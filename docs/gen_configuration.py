"""Regenerate the schema table inside docs/configuration.md (make docs).

The table comes from user_dist.config.schema_markdown(): every key's type,
default, allowed values and meaning, read from the schema's field metadata.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from user_dist.atomic import atomic_write  # noqa: E402
from user_dist.config import schema_markdown  # noqa: E402

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration.md")
BEGIN, END = "<!-- schema:begin -->\n", "\n<!-- schema:end -->"

with open(PATH) as f:
    text = f.read()
head, rest = text.split(BEGIN, 1)
tail = rest.split(END, 1)[1]
atomic_write(PATH, head + BEGIN + schema_markdown() + END + tail)
