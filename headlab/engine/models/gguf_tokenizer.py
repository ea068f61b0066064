"""A GGUF file's tokenizer, carried into another GGUF file as it is.

    copy_tokenizer_fields(gguf.GGUFReader(source), writer)

llama.cpp reads the vocabulary, merges or scores, token types, special token ids and chat template
from the `tokenizer.*` fields; copying them makes a written file tokenize exactly as the source does
(headlab.engine.export.gguf for an export of a shipped model; headlab.engine.models.shipped.gemma3
for the Gemma tokenizer-only file those exports copy from).
"""

from __future__ import annotations

import gguf

__all__ = ["copy_tokenizer_fields"]


def copy_tokenizer_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every `tokenizer.*` field of the file `reader` reads, added to `writer` as it is."""
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = f.types[0]
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY
                                 else None)
