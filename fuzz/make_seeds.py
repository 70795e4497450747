"""Writes fuzz/corpus/: the seed messages of fuzz_proto (python3 fuzz/make_seeds.py).

Valid requests of every op and tool (task ids of the qwen2 example pack), and
the malformed ones the validator must refuse without allocating: containers
and strings whose declared length runs past the message or over the caps,
bin/ext values, nesting past 16 levels, truncations, non-string keys, huge
integers, NaN and infinite floats, bad UTF-8, NUL bytes, trailing bytes.
The files are committed; run this again after changing it.
"""
import math
import pathlib
import struct

import msgpack

OUT = pathlib.Path(__file__).resolve().parent / "corpus"
MLP = ("def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
       "    return F.linear(F.silu(F.linear(x, weights['gate_proj.weight'])) * "
       "F.linear(x, weights['up_proj.weight']), weights['down_proj.weight'])\n")


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def nest(levels):
    """An array nested `levels` deep around 1."""
    v = 1
    for _ in range(levels):
        v = [v]
    return v


def step(tool, args, episode=1, req=3):
    return pack({"op": "step", "req": req, "episode": episode,
                 "action": {"tool": tool, "args": args}})


seeds = {
    "hello": pack({"op": "hello", "req": 1}),
    "spec": pack({"op": "spec", "req": 2}),
    "list_tasks": pack({"op": "list_tasks"}),
    "health": pack({"op": "health", "req": 0}),
    "reset_task": pack({"op": "reset", "req": 5, "task": "qwen2/Qwen2MLP", "seed": 3,
                        "policy": "fuzz"}),
    "reset_round_robin": pack({"op": "reset", "seed": -1, "policy": None, "task": None}),
    "reset_model": pack({"op": "reset", "task": "qwen2", "seed": 2**62}),
    "close": pack({"op": "close", "req": 9, "episode": 4}),
    "step_source": step("read_module_source", {"path": "model.layers.0.mlp", "mode": "live"}),
    "step_source_full": step("read_module_source", {}),
    "step_weights": step("get_weight_info", {"path": "model.layers.0.self_attn"}, episode=0),
    "step_capture": step("capture_intermediate", {"path": "model.layers.0.mlp", "probe": 0,
                                                  "call": 0, "values": True}),
    "step_capture_name": step("capture_intermediate", {"probe": "p1", "values": False}),
    "step_capture_hidden": step("capture_intermediate", {"probe": "p4"}),
    "step_capture_bad_call": step("capture_intermediate", {"probe": 0, "call": 99}),
    "step_trace": step("trace_ops", {"path": "model.layers.1"}),
    "step_unknown_path": step("trace_ops", {"path": "model.layer.0"}),
    "step_verify": step("verify_component", {"path": "model.layers.0.mlp", "code": MLP,
                                             "entry": "forward"}),
    "step_submit": step("submit", {"code": MLP}),
    "step_bad_args": step("get_weight_info", {"nope": 1, "path": 3}),
    "step_unknown_tool": step("rm_rf", {}),
    "step_args_not_map": step("trace_ops", [1, 2, 3]),
    "unknown_op": pack({"op": "format_disk", "req": 1}),
    "no_op": pack({"req": 1}),
    "req_uint64_max": pack({"op": "hello", "req": 2**64 - 1}),
    "req_negative": pack({"op": "hello", "req": -5}),
    "huge_ints": pack({"op": "reset", "seed": -2**63, "a": 2**64 - 1, "b": [2**63, -1, 0]}),
    "floats": pack({"op": "reset", "seed": 1.5, "x": [math.nan, math.inf, -math.inf, -0.0,
                                                       5e-324]}),
    "float32": b"\x82\xa2op\xa5reset\xa4seed\xca" + struct.pack(">f", 3.0),
    "nested_16": pack({"op": "step", "episode": 1, "action": {"tool": "trace_ops", "args": {
        "path": {"a": nest(11)}}}}),
    "nested_17": pack({"op": "x", "v": nest(16)}),
    "array32_4g": b"\x81\xa1a\xdd\xff\xff\xff\xff",
    "map32_4g": b"\x81\xa1a\xdf\xff\xff\xff\xff\x00",
    "str32_4g": b"\x81\xa1a\xdb\xff\xff\xff\xffabc",
    "str32_over_cap": b"\x81\xa1a\xdb\x00\x50\x00\x00" + b"x" * 16,
    "bin32": b"\x81\xa1a\xc6\x00\x00\x00\x04abcd",
    "bin8": pack({"op": "hello", "b": b"\x00\x01"}),
    "ext": b"\x81\xa1a\xd4\x01\x02",
    "ext32": b"\x81\xa1a\xc9\xff\xff\xff\xff\x01",
    "array16_short": b"\x81\xa1a\xdc\x00\x10\x01\x02",
    "map16_entries": b"\xde\x00\x02\xa2op\xa5hello\xa3req\x01",
    "truncated": pack({"op": "step", "episode": 1, "action": {"tool": "trace_ops"}})[:-3],
    "truncated_number": b"\x81\xa1a\xcf\x00\x00",
    "non_string_key": b"\x82\xa2op\xa5hello\x01\x02",
    "map_key_map": b"\x81\x81\xa1a\x01\x02",
    "bad_utf8": b"\x81\xa2op\xa3\xff\xfe\xfd",
    "overlong_utf8": b"\x81\xa2op\xa2\xc0\xaf",
    "surrogate_utf8": b"\x81\xa2op\xa3\xed\xa0\x80",
    "nul_in_string": b"\x81\xa2op\xa3a\x00b",
    "nul_in_key": b"\x81\xa3o\x00p\xa5hello",
    "trailing": pack({"op": "hello"}) + b"\xc0",
    "top_array": pack(["op", "hello"]),
    "top_nil": b"\xc0",
    "empty_map": b"\x80",
    "never_used_byte": b"\x81\xa1a\xc1",
    "duplicate_keys": b"\x83\xa2op\xa5hello\xa3req\x01\xa3req\x02",
    "many_values": pack({"op": "x", "v": list(range(3000))}),
    "long_policy": pack({"op": "reset", "policy": "p" * 300}),
}

OUT.mkdir(exist_ok=True)
for old in OUT.iterdir():
    old.unlink()
for name, data in seeds.items():
    (OUT / f"{name}.msgpack").write_bytes(data)
print(f"{len(seeds)} seeds in {OUT}")
