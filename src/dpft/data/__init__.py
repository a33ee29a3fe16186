"""Training data: read and validate records, encode them into examples, write canaries shaped like them."""

from dpft.data.encode import EncodedDataset, Example, collate, encode_records
from dpft.data.records import Record, count_duplicates, read_records

__all__ = [
    "EncodedDataset",
    "Example",
    "Record",
    "collate",
    "count_duplicates",
    "encode_records",
    "read_records",
]
