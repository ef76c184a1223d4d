"""Data: tokenizers, JSONL records, the chat template, packing and the curriculum.

The path from a JSONL file to training batches::

    examples = read_jsonl("train.jsonl")
    stage = order_by_difficulty(select_stage(examples, mode="fast"), schedule="bucketed")
    tokenizer = load_tokenizer("byte")
    template = default_template(tokenizer)
    docs = [tokenize_example(ex, tokenizer, template) for ex in stage]
    batches = shard_batches(pack_examples(docs, budget=4096), rank, world_size)
"""

from .chat import (
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    ChatRenderer,
    ChatTemplate,
    TokenizedExample,
    default_template,
    tokenize_example,
)
from .curriculum import example_difficulty, order_by_difficulty, select_stage
from .packing import PackedBatch, overlong_examples, pack_examples, shard_batches
from .records import (
    Example,
    Message,
    RecordError,
    example_to_record,
    fingerprint_examples,
    read_jsonl,
    write_jsonl,
)
from .tokenizer import BYTE_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BYTE_SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "ByteTokenizer",
    "ChatRenderer",
    "ChatTemplate",
    "Example",
    "HFTokenizer",
    "Message",
    "PackedBatch",
    "RecordError",
    "TokenizedExample",
    "Tokenizer",
    "default_template",
    "example_difficulty",
    "example_to_record",
    "fingerprint_examples",
    "load_tokenizer",
    "order_by_difficulty",
    "overlong_examples",
    "pack_examples",
    "read_jsonl",
    "select_stage",
    "shard_batches",
    "tokenize_example",
    "write_jsonl",
]
