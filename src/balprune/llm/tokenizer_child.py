"""One call of the ``tokenizers`` library on a tokenizer.json somebody else made, in a child process.

Run by llm.text.TextCodec as ``python tokenizer_child.py`` (a script: it imports nothing of balprune,
so the child starts in ~0.15 s). Why a child: a tokenizer.json can make the library allocate without
bound (a chain of Replace normalizers doubling a character, a template repeating the text, a Prepend
on every added token at load time), and the Rust allocator aborts the whole process when an
allocation fails, with nothing said. Here the child caps its own address space first, so such a file
costs at most the memory available and the parent reports it in one line (exit 4).

Protocol. stdin: an 8-byte little-endian header length, a JSON header {"op": "encode" | "decode",
"tokenizer_bytes": n, "memory_limit": bytes or null}, the tokenizer.json (n bytes, UTF-8), then the
payload: for encode the text (UTF-8), for decode the ids (int64 little-endian). stdout on success
(exit 0): the ids (int64 little-endian), or the text (UTF-8). A refusal by the library (exit 3): stdout
is "load" or the op, a newline, and the library's message. Out of memory: exit 4 (a MemoryError), or
killed by SIGABRT / SIGKILL (the allocator, the kernel).
"""

from __future__ import annotations

import json
import struct
import sys
from array import array

REFUSED = 3
OUT_OF_MEMORY = 4


def deterministic(tok) -> None:
    """Switch off what would make a tokenizer give other ids for the same text than the text itself does:
    its padding and truncation settings (a fixed padding of 10^15 aborts the process in the allocator; one
    of 10^6 makes eval score padding) and BPE dropout (a training-time regulariser: other ids every run)."""
    tok.no_padding()
    tok.no_truncation()
    if getattr(tok.model, "dropout", None) is not None:
        tok.model.dropout = None


def _limit_memory(limit: int | None) -> None:
    if limit is None:
        return
    try:
        import resource
    except ImportError:  # not a POSIX system: no cap (the parent still catches the library's errors)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _refuse(stage: str, exc: BaseException) -> int:
    sys.stdout.buffer.write(f"{stage}\n{exc}".encode("utf-8", "replace"))
    return REFUSED


def main() -> int:
    data = sys.stdin.buffer.read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    _limit_memory(header["memory_limit"])
    start = 8 + size
    tokenizer_text = data[start:start + header["tokenizer_bytes"]].decode("utf-8")
    payload = data[start + header["tokenizer_bytes"]:]
    del data
    try:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(tokenizer_text)
        except MemoryError:
            raise
        except BaseException as exc:  # noqa: B036 - a Rust panic reaches Python as a BaseException
            return _refuse("load", exc)
        deterministic(tok)
        op = header["op"]
        try:
            if op == "encode":
                out = array("q", tok.encode(payload.decode("utf-8", "surrogatepass"), add_special_tokens=True).ids)
                if sys.byteorder != "little":
                    out.byteswap()
                result = out.tobytes()
            else:
                ids = array("q")
                ids.frombytes(payload)
                if sys.byteorder != "little":
                    ids.byteswap()
                result = tok.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8", "surrogatepass")
        except MemoryError:
            raise
        except BaseException as exc:  # noqa: B036
            return _refuse(op, exc)
    except MemoryError:
        return OUT_OF_MEMORY
    sys.stdout.buffer.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
