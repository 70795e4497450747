"""evaluate.py — the evaluation process: candidate files run here as real Python.

fmx grades a candidate on what the file means in Python (DESIGN.md, decision 1),
and it grades it where the candidate cannot reach the grade (decision 8). This
module is the half that runs candidate code; the half that grades it is C
(env/evaluator.c drives this process, env/verify.c compares the outputs).

Zygote: `python3 -m fmx.evaluate --zygote FD --engine SO [--threads N] [--device D]`
imports torch, warms it up (every lazy initialisation that opens files happens
now), loads fmx's engine library (the TorchScript compile check) and then serves
the AF_UNIX socket FD: each request `{"op": "run", "timeout_s": S}` comes with two
file descriptors, a sealed memfd holding the job (below) and an empty sealed
memfd of fixed size for the results. Every request runs in a fresh child
forked from the zygote (forked ahead, while the zygote has nothing to do), so
no heap or allocator state of an earlier evaluation is reachable. The zygote
waits for the child's "done" byte (its results written and sealed against
writes: the child is killed then and reaped later, so its exit is not on the
grade's path), its end, or the deadline (SIGKILL), and answers
`{"status": "exit"|"signal"|"timeout", "code", "signal", "done", "ms"}`.
The zygote never runs candidate code and never reads a job.

Child: maps the job (MAP_PRIVATE: the inputs are its own copies) and the weights
file the job names (public, or the hidden set for hidden probes), closes every
other descriptor, enters the sandbox (rlimits, no_new_privs, the seccomp filter of
env/sandbox.c: no files, sockets, processes), then:
  1. with "check": compiles the file with TorchScript (fmx's candidate language:
     the compile-compatibility signal), reads the graph's facts and runs calls[0]
     unoptimised and optimised (fmx_check_candidate in env/engine/check.c);
  2. with "run": executes the file as a module (imports limited to torch, math,
     typing), calls the entry on every call of the job with the call's inputs
     bound by parameter name and a fresh weights dict, records tap() values;
  3. writes its results into the results memfd, seals it (F_SEAL_WRITE), says
     "done" and exits 0.
The child holds only what it was given: the weights and the inputs of the calls
it runs — never a reference output, never another probe's data.

Job memfd: u64 little-endian header length, the JSON header, then tensor bytes at
64-byte-aligned offsets counted from the end of the header (docs/security.md):
  {"code", "filename", "entry", "component", "module_class", "device", "threads",
   "mem_mb", "cpu_s", "weights_path", "weights": [[rel, key], ...], "pack_dtype",
   "tensors": [{"dtype", "shape", "offset", "nbytes"}],
   "calls": [{"dtype", "inputs": [{"name", "kind": "tensor"|"value"|"none"|"cache"
              |"other", "tensor": i, "type": "int"|"float"|"bool"|"str", "value"}]}],
   "run": bool, "check": bool, "max_taps": N, "max_tap_bytes": N}
Results memfd: "FMXRES01", u64 header offset, u64 header length, tensor bytes
from offset 64, the JSON header last:
  {"load_ms", "error": {"stage", "message"}, "calls": [{"ok", "ms", "outputs":
   [blob], "taps": [{"name", ...blob}], "taps_cut"} | {"ok": false, "stage",
   "error"}], "check": {"compiled", "error", "entry", "host_syncs",
   "data_dependent_flow", "first_line", "first_problem", "ran",
   "survives_optimization", "why", "outputs": [blob]}}
  blob = {"dtype", "shape", "offset", "nbytes"}

Not here: comparing outputs, tolerances, reports (C, in a process that never runs
candidate code); which probes run in which child (env/verify.c).
"""
from __future__ import annotations

import ast
import ctypes
import difflib
import fcntl
import inspect
import io
import json
import math
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
import tokenize
import traceback

EXIT_OOM = 3
EXIT_INTERNAL = 4
MAGIC = b"FMXRES01"
DATA_START = 64

# Modules a candidate may import: files stay self-contained (README, "The
# candidate language").
ALLOWED_MODULES = ("torch", "torch.nn", "torch.nn.functional", "math", "typing",
                   "__future__")

# What torch itself may import lazily while a candidate runs.
INTERNAL_MODULES = {"torch", "math", "typing", "__future__", "numpy", "collections", "functools",
                    "itertools", "numbers", "warnings", "copyreg", "enum", "contextlib", "abc",
                    "operator", "weakref", "types", "dataclasses", "re", "string"}

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16",
                      "BF16": "bfloat16", "I64": "int64", "I32": "int32", "I16": "int16",
                      "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# ---- the engine library (TorchScript compile check, sandbox) ----

class CheckInput(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("kind", ctypes.c_int), ("data", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("ndim", ctypes.c_int),
                ("shape", ctypes.c_int64 * 8), ("i", ctypes.c_int64), ("f", ctypes.c_double),
                ("s", ctypes.c_char_p)]


class CheckReport(ctypes.Structure):
    _fields_ = [("compiled", ctypes.c_int), ("entry_found", ctypes.c_int),
                ("ran", ctypes.c_int), ("host_syncs", ctypes.c_int),
                ("data_dependent_flow", ctypes.c_int), ("first_line", ctypes.c_int),
                ("survives_optimization", ctypes.c_int), ("noutputs", ctypes.c_int),
                ("error", ctypes.c_char * 4096), ("first_problem", ctypes.c_char * 256),
                ("why", ctypes.c_char * 512)]


# engine.h's fmx_dtype order
ENGINE_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                 "int8", "uint8", "bool"]
KIND_TENSOR, KIND_NONE, KIND_INT, KIND_FLOAT, KIND_BOOL, KIND_STR = range(6)


def load_engine(path):
    lib = ctypes.CDLL(path)
    lib.fmx_check_candidate.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(CheckInput),
        ctypes.c_int, ctypes.POINTER(CheckInput), ctypes.c_int, ctypes.POINTER(CheckReport),
        ctypes.POINTER(ctypes.c_void_p)]
    lib.fmx_check_candidate.restype = ctypes.c_int
    lib.fmx_run_noutputs.argtypes = [ctypes.c_void_p]
    lib.fmx_run_output.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.fmx_run_output.restype = ctypes.c_void_p
    lib.fmx_run_destroy.argtypes = [ctypes.c_void_p]
    lib.fmx_tensor_shape.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                                     ctypes.POINTER(ctypes.c_int)]
    lib.fmx_tensor_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_char_p, ctypes.c_size_t]
    lib.fmx_sandbox_enter.argtypes = [ctypes.c_long, ctypes.c_double, ctypes.c_int,
                                      ctypes.c_char_p, ctypes.c_size_t]
    lib.fmx_sandbox_enter.restype = ctypes.c_int
    return lib


# ---- torch < 2 lacks two functions torch 2.x files use ----

def install_compat(torch, F):
    """F.scaled_dot_product_attention and F.rms_norm where this torch lacks them:
    the same math as aten's composite versions (and as the compile check's
    prelude, env/engine/prelude.py), so a torch 2.x file means the same here."""
    if not hasattr(F, "scaled_dot_product_attention"):
        def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                         is_causal=False, scale=None, enable_gqa=False):
            L, S = query.size(-2), key.size(-2)
            scale_factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
            if enable_gqa:
                rep = query.size(-3) // key.size(-3)
                key = key.repeat_interleave(rep, -3)
                value = value.repeat_interleave(rep, -3)
            root = math.sqrt(scale_factor)
            attn = torch.matmul(query * root, key.transpose(-2, -1) * root)
            if is_causal:
                if attn_mask is not None:
                    raise RuntimeError("scaled_dot_product_attention: Explicit attn_mask "
                                       "should not be set when is_causal=True")
                keep = torch.ones([L, S], dtype=torch.bool, device=query.device).tril()
                attn = attn.masked_fill(keep.logical_not(), -math.inf)
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    attn = attn.masked_fill(attn_mask.logical_not(), -math.inf)
                else:
                    attn = attn + attn_mask
            probs = torch.softmax(attn, -1)
            dead = (attn == -math.inf).all(-1, keepdim=True)
            probs = probs.masked_fill(dead, 0.0)
            if dropout_p > 0.0:
                probs = torch.dropout(probs, dropout_p, True)
            return torch.matmul(probs, value)
        F.scaled_dot_product_attention = scaled_dot_product_attention
    if not hasattr(F, "rms_norm"):
        def rms_norm(input, normalized_shape, weight=None, eps=None):
            dims = [input.dim() - i - 1 for i in range(len(normalized_shape))]
            h = input
            if input.dtype in (torch.float16, torch.bfloat16):
                h = input.to(torch.float32)
            e = torch.finfo(h.dtype).eps if eps is None else eps
            out = (h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + e)).type_as(input)
            return out * weight if weight is not None else out
        F.rms_norm = rms_norm


def warm_up(torch, F):
    """Touches the kernels candidates use, in float32 and bfloat16, so lazy
    initialisations (which may open files) happen before any fork."""
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 8, 16, generator=g).to(dt)
        w = torch.randn(16, 16, generator=g).to(dt)
        h = F.layer_norm(x, [16])
        q = F.linear(h, w, w[0])
        a = torch.softmax(q @ q.transpose(-1, -2) / 8.0, dim=-1)
        m = torch.triu(torch.ones(8, 8), 1).to(torch.bool)
        y = a.masked_fill(m, 0.0) @ h
        y = F.silu(y) + F.gelu(y) + F.gelu(y, approximate="tanh") + torch.tanh(y) + torch.erf(y)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        F.embedding(torch.arange(8).unsqueeze(0), w)
        torch.cat((y.cos(), y.sin()), dim=-1).float()
        F.scaled_dot_product_attention(h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1),
                                       is_causal=True)
        F.conv1d(h.transpose(1, 2), w.unsqueeze(-1))
        torch.cumsum(y, 1).amax()
        torch.einsum("bij,bjk->bik", y, y.transpose(1, 2))
        torch.where(y > 0, y, -y).clamp(-1.0, 1.0).sum().item()
    torch.finfo(torch.bfloat16)


# ---- the zygote ----

def zygote(fd, engine_path, threads, device):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(max(1, threads))
    install_compat(torch, F)
    warm_up(torch, F)
    lib = load_engine(engine_path)
    warm_check(lib, torch)
    sock = socket.socket(fileno=fd)
    sock.sendall(json.dumps({"ready": True, "pid": os.getpid(),
                             "torch": torch.__version__}).encode())
    spare = None  # the next evaluation's child, forked while there is nothing to do
    dying = []  # children that said "done" and were killed: reaped later
    while True:
        dying = [pid for pid in dying if os.waitpid(pid, os.WNOHANG)[0] == 0]
        if spare is None:
            spare = Spare(sock.fileno(), lib)
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 65536, 4)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        try:
            req = json.loads(msg)
        except ValueError:
            req = {}
        if req.get("op") != "run" or len(fds) not in (2, 3):
            for f in fds:
                os.close(f)
            sock.sendall(json.dumps({"status": "refused", "why": "bad request"}).encode())
            continue
        t0 = time.monotonic()
        child_, spare = spare, None
        child_.start(fds)
        reply = wait_child(child_, float(req.get("timeout_s") or 0), t0, sock)
        if reply is None:  # the grader is gone
            os._exit(0)
        sock.sendall(json.dumps(reply).encode())
        if reply.get("done"):
            dying.append(child_.pid)


class Spare:
    """A child forked from the clean zygote before its job is known. It waits
    on its own socket for the job's two descriptors (start), then runs the
    job (child) and, once its results are sealed, writes a byte to its done
    pipe: the zygote answers then and kills it, and the child's exit (tearing
    down a torch-sized address space) is off the grade's path."""

    def __init__(self, zygote_fd, lib):
        ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        done_r, done_w = os.pipe()
        zygote = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                if os.getppid() != zygote:  # it died before the line above
                    os._exit(0)
                ctl_parent.close()
                os.close(done_r)
                _, fds, _, _ = socket.recv_fds(ctl_child, 16, 3)
                ctl_child.close()
            except BaseException:  # noqa: BLE001 — the zygote is gone
                os._exit(0)
            if len(fds) not in (2, 3):
                os._exit(0)
            child(fds[0], fds[1], fds[2] if len(fds) == 3 else None, zygote_fd, lib, done_w)
        ctl_child.close()
        os.close(done_w)
        self.ctl, self.done = ctl_parent, done_r

    def start(self, fds):
        try:
            socket.send_fds(self.ctl, [b"j"], fds)
        except OSError:
            pass  # it died waiting: wait_child reports it
        finally:
            for f in fds:
                os.close(f)
            self.ctl.close()


def wait_child(ch, timeout_s, t0, sock):
    """Waits for the child: its done byte (results sealed; it is killed and
    reaped later), its end, the deadline (SIGKILL), or the grader's socket
    closing (SIGKILL, then None). The reply for the grader."""
    timed_out = gone = done = False
    pidfd = os.pidfd_open(ch.pid)
    try:
        poller = select.poll()
        poller.register(ch.done, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP)
        while True:
            left = None if timeout_s <= 0 else timeout_s - (time.monotonic() - t0)
            if left is not None and left <= 0:
                os.kill(ch.pid, signal.SIGKILL)
                timed_out = True
                break
            events = poller.poll(None if left is None else max(1, int(left * 1000)))
            ready = {fd for fd, _ in events}
            if ch.done in ready:
                if os.read(ch.done, 1):
                    os.kill(ch.pid, signal.SIGKILL)
                    done = True
                    break
                poller.unregister(ch.done)  # closed unsaid: the child is ending
            if pidfd in ready:
                break
            if sock.fileno() in ready:
                try:
                    alive = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not alive:
                    os.kill(ch.pid, signal.SIGKILL)
                    gone = True
                    break
    finally:
        os.close(pidfd)
        os.close(ch.done)
    ms = (time.monotonic() - t0) * 1000.0
    if done:
        return {"status": "exit", "code": 0, "done": True, "ms": ms}
    _, status, ru = os.wait4(ch.pid, 0)
    if gone:
        return None
    out = {"ms": ms, "maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime}
    if timed_out:
        out["status"] = "timeout"
    elif os.WIFSIGNALED(status):
        out.update(status="signal", signal=os.WTERMSIG(status))
    else:
        out.update(status="exit", code=os.WEXITSTATUS(status))
    return out


def warm_check(lib, torch):
    """One compile check in the zygote: TorchScript's lazy set-up happens here."""
    src = (b"import torch\nfrom torch import Tensor\nfrom typing import Dict\n\n"
           b"def forward(x: Tensor, weights: Dict[str, Tensor]) -> Tensor:\n"
           b"    return torch.softmax(x @ weights['w'], -1)\n")
    x = torch.ones(2, 4)
    w = torch.ones(4, 4)
    inputs = (CheckInput * 1)()
    fill_check_input(inputs[0], b"x", x)
    weights = (CheckInput * 1)()
    fill_check_input(weights[0], b"w", w)
    rep = CheckReport()
    run = ctypes.c_void_p()
    lib.fmx_check_candidate(src, len(src), b"forward", inputs, 1, weights, 1,
                            ctypes.byref(rep), ctypes.byref(run))
    lib.fmx_run_destroy(run)


def fill_check_input(ci, name, value):
    ci.name = name
    if value is None:
        ci.kind = KIND_NONE
    elif hasattr(value, "data_ptr"):
        ci.kind = KIND_TENSOR
        ci.data = value.data_ptr()
        ci.dtype = ENGINE_DTYPES.index(str(value.dtype).replace("torch.", ""))
        ci.ndim = value.dim()
        for d, n in enumerate(value.shape):
            ci.shape[d] = n
    elif isinstance(value, bool):
        ci.kind, ci.i = KIND_BOOL, int(value)
    elif isinstance(value, int):
        ci.kind, ci.i = KIND_INT, value
    elif isinstance(value, float):
        ci.kind, ci.f = KIND_FLOAT, value
    else:
        ci.kind, ci.s = KIND_STR, str(value).encode()


# ---- the child ----

class Results:
    """The results memfd: tensor bytes first, the JSON header last."""

    def __init__(self, fd, area=None):
        self.fd = fd
        self.cap = os.fstat(fd).st_size
        self.off = DATA_START
        self.area = area  # blobs say which memfd holds them ("check": the compile check's)

    def blob(self, t):
        import torch
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = str(t.dtype).replace("torch.", "")
        if name not in ENGINE_DTYPES:
            raise TypeError(f"a tensor of dtype {name}; fmx grades float, int and bool tensors")
        nbytes = t.numel() * t.element_size()
        if self.off + nbytes > self.cap - (1 << 20):
            raise MemoryError(f"outputs larger than {self.cap >> 20} MiB")
        if nbytes:
            raw = t.reshape(-1).view(torch.uint8).numpy()
            written = 0
            view = memoryview(raw)
            while written < nbytes:
                written += os.pwrite(self.fd, view[written:], self.off + written)
        b = {"dtype": name, "shape": list(t.shape), "offset": self.off, "nbytes": nbytes}
        if self.area:
            b["area"] = self.area
        self.off += (nbytes + 63) // 64 * 64
        return b

    def finish(self, header):
        data = json.dumps(header, allow_nan=True).encode()
        if self.off + len(data) > self.cap:
            data = json.dumps({"error": {"stage": "run", "message":
                                         "the results are too large"}}).encode()
            self.off = DATA_START
        os.pwrite(self.fd, data, self.off)
        os.pwrite(self.fd, MAGIC + struct.pack("<QQ", self.off, len(data)), 0)

    def seal_and_close(self):
        """No more writes by anyone (F_SEAL_WRITE), and this process lets go of it."""
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        os.close(self.fd)


def child(job_fd, result_fd, check_fd, zygote_fd, lib, done_fd):
    try:
        os.close(zygote_fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        job, tensors, weights_map = map_job(job_fd)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        keep = {0, 1, 2, result_fd, done_fd, check_fd}
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        import torch
        torch.set_num_threads(max(1, int(job.get("threads") or 1)))
        device = job.get("device") or "cpu"
        if device != "cpu":
            torch.zeros(1, device=device) @ torch.zeros(1, 1, device=device)
            tensors = [t.to(device) for t in tensors]
            weights_map = {k: v.to(device) for k, v in weights_map.items()}
        err = ctypes.create_string_buffer(512)
        if lib.fmx_sandbox_enter(int(job.get("mem_mb") or 0), float(job.get("cpu_s") or 0),
                                 1, err, len(err)) != 0:
            sys.stderr.write(f"fmx evaluation: sandbox: {err.value.decode()}\n")
            os._exit(EXIT_INTERNAL)
        results = Results(result_fd)
        header = evaluate(job, tensors, weights_map, results, lib,
                          Results(check_fd, area="check") if check_fd is not None else None)
        results.finish(header)
        # sealed: nothing (no thread the candidate started) can change them
        # now, so the grader may read them before this process is gone
        fcntl.fcntl(result_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        os.write(done_fd, b"d")
        os._exit(0)
    except MemoryError:
        os._exit(EXIT_OOM)
    except BaseException:  # fmx's own bug: the grader reports a crash
        try:
            traceback.print_exc()
        finally:
            os._exit(EXIT_INTERNAL)


def map_job(fd):
    """The job's header, its input tensors (views of a private mapping) and the
    weights file's tensors by stored name (views of a private mapping)."""
    import torch
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    os.close(fd)
    (hlen,) = struct.unpack("<Q", mm[:8])
    job = json.loads(mm[8:8 + hlen])
    base = (8 + hlen + 63) // 64 * 64
    tensors = [tensor_view(torch, mm, base + t["offset"], t["dtype"], t["shape"])
               for t in job.get("tensors", [])]
    weights = {}
    path = job.get("weights_path")
    if path and job.get("weights"):
        wfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            wsize = os.fstat(wfd).st_size
            wm = mmap.mmap(wfd, wsize, access=mmap.ACCESS_COPY) if wsize else b""
        finally:
            os.close(wfd)
        (n,) = struct.unpack("<Q", wm[:8])
        entries = json.loads(wm[8:8 + n])
        wanted = {key for _, key in job["weights"]}
        for key in wanted:
            e = entries[key]
            a, _ = e["data_offsets"]
            weights[key] = tensor_view(torch, wm, 8 + n + a, SAFETENSORS_DTYPES[e["dtype"]],
                                       e["shape"])
    return job, tensors, weights


def tensor_view(torch, buf, offset, dtype, shape):
    dt = getattr(torch, dtype)
    count = 1
    for s in shape:
        count *= s
    if count == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(buf, dtype=dt, count=count, offset=offset).view(shape)


def evaluate(job, tensors, weights_map, results, lib, check_results=None):
    import torch
    header = {"calls": []}
    pack_dtype = job.get("pack_dtype", "float32")
    casts = {}

    def weights_for(dtype):
        """A fresh dict each call (a candidate cannot change what the next sees),
        floating weights cast to the probe's dtype as the exporter's
        model.to(dtype) did."""
        if dtype not in casts:
            dt = getattr(torch, dtype)
            casts[dtype] = {k: (v.to(dt) if dtype != pack_dtype and v.is_floating_point()
                                else v) for k, v in weights_map.items()}
        stored = casts[dtype]
        return {rel: stored[key] for rel, key in job.get("weights", [])}

    calls = job.get("calls", [])
    if job.get("check") and calls and check_results is not None:
        # into a memfd of its own, sealed and closed before the candidate's
        # Python runs: nothing the candidate does can change the facts
        check = compile_check(job, calls[0], tensors, weights_for, check_results, lib)
        if check_results is not None:
            check_results.finish({"check": check})
            check_results.seal_and_close()
    if not job.get("run", True):
        return header
    t0 = time.perf_counter()
    fn, error = load_candidate(job)
    header["load_ms"] = (time.perf_counter() - t0) * 1000.0
    if error:
        header["error"] = error
        return header
    for call in calls:
        header["calls"].append(run_call(job, fn, call, tensors, weights_for, results))
    return header


def compile_check(job, call, tensors, weights_for, results, lib):
    """TorchScript's view of the file (the compile score), on calls[0]. Runs
    before the candidate's Python so nothing it does can touch the facts."""
    import torch
    code = job["code"].encode()
    inputs = call_inputs(call, tensors)
    arr = (CheckInput * max(1, len(inputs)))()
    keep = []
    for i, (name, value) in enumerate(inputs.items()):
        if hasattr(value, "contiguous"):
            value = value.contiguous()
        keep.append(value)
        fill_check_input(arr[i], name.encode(), value)
    weights = weights_for(call.get("dtype", job.get("pack_dtype", "float32")))
    warr = (CheckInput * max(1, len(weights)))()
    for i, (k, v) in enumerate(weights.items()):
        v = v.contiguous()
        keep.append(v)
        fill_check_input(warr[i], k.encode(), v)
    rep = CheckReport()
    run = ctypes.c_void_p()
    lib.fmx_check_candidate(code, len(code), job.get("entry", "forward").encode(), arr,
                            len(inputs), warr, len(weights), ctypes.byref(rep),
                            ctypes.byref(run))
    out = {"compiled": bool(rep.compiled), "entry": bool(rep.entry_found),
           "ran": bool(rep.ran), "host_syncs": rep.host_syncs,
           "data_dependent_flow": rep.data_dependent_flow, "first_line": rep.first_line,
           "first_problem": rep.first_problem.decode(errors="replace"),
           "survives_optimization": bool(rep.survives_optimization),
           "error": rep.error.decode(errors="replace"), "why": rep.why.decode(errors="replace"),
           "outputs": []}
    try:
        if run:
            for i in range(lib.fmx_run_noutputs(run)):
                t = lib.fmx_run_output(run, i)
                shape = (ctypes.c_int64 * 8)()
                dt = ctypes.c_int()
                nd = lib.fmx_tensor_shape(t, shape, ctypes.byref(dt))
                if nd < 0:
                    break
                host = torch.empty(list(shape[:nd]), dtype=getattr(torch, ENGINE_DTYPES[dt.value]))
                err = ctypes.create_string_buffer(256)
                lib.fmx_tensor_read(t, host.data_ptr(), host.numel() * host.element_size(), err,
                                    len(err))
                out["outputs"].append(results.blob(host))
    finally:
        lib.fmx_run_destroy(run)
    return out


def call_inputs(call, tensors):
    """name -> value for the inputs fmx passes (caches and objects are not)."""
    out = {}
    for inp in call.get("inputs", []):
        kind = inp.get("kind")
        if kind == "tensor":
            out[inp["name"]] = tensors[inp["tensor"]]
        elif kind == "value":
            out[inp["name"]] = typed_value(inp)
        elif kind == "none":
            out[inp["name"]] = None
    return out


def typed_value(inp):
    v, t = inp.get("value"), inp.get("type")
    if t == "float":
        return float(v)
    if t == "int":
        return int(v)
    if t == "bool":
        return bool(v)
    return v


# ---- loading the candidate ----

class LoadError(Exception):
    pass


def load_candidate(job):
    """The entry function of the candidate file, executed as a module; or
    (None, {"stage", "message"})."""
    import torch
    filename = job.get("filename") or "candidate.py"
    code = job["code"]
    entry = job.get("entry") or "forward"
    lines = code.splitlines()
    try:
        tree = ast.parse(code, filename=filename)
    except SyntaxError as e:
        return None, {"stage": "compile", "message": located(filename, e.lineno or 1,
                                                             (e.offset or 1) - 1, lines,
                                                             f"SyntaxError: {e.msg}")}
    except (ValueError, RecursionError, MemoryError) as e:
        return None, {"stage": "compile", "message": f"{filename}: cannot be parsed: "
                                          f"{type(e).__name__}: {e}"}
    tree.body = [node for node in tree.body if not zero_loc_block(node)]
    bad = check_imports(tree)
    if bad:
        node, what = bad
        return None, {"stage": "compile", "message": located(
            filename, node.lineno, node.col_offset, lines,
            f"import not allowed: '{what}' (fmx files import only torch, torch.nn, "
            "torch.nn.functional, math and typing, so they stay self-contained)")}
    taps = TapRecorder(int(job.get("max_taps") or 1024), int(job.get("max_tap_bytes") or 0))
    g = {"__name__": "fmx_candidate", "__file__": filename,
         "__builtins__": candidate_builtins(), "tap": taps}
    guard = CodeGuard(filename)
    try:
        compiled = compile(tree, filename, "exec", dont_inherit=True)
        guard.install(torch)
        guard.module_code, guard.armed = compiled, True
        with torch.no_grad():
            exec(compiled, g)
    except MemoryError:
        raise
    except BaseException as e:  # noqa: BLE001 — the candidate's error, reported as such
        return None, {"stage": "compile", "message": "loading the file: " +
                      (guard.violation or describe_error(e, filename, lines))}
    if guard.violation:
        return None, {"stage": "compile", "message": "loading the file: " + guard.violation}
    g["tap"] = taps  # a top-level `def tap` (the identity) is replaced by fmx's recorder
    fn = g.get(entry)
    if not callable(fn) or isinstance(fn, type):
        defined = [k for k, v in g.items() if inspect.isfunction(v) and
                   getattr(v, "__module__", None) == "fmx_candidate" and not k.startswith("__")]
        return None, {"stage": "entry", "message":
                      f"the candidate has no function '{entry}'; it defines: "
                      f"{', '.join(defined) if defined else '(nothing)'}"}
    fn.__fmx_taps__ = taps
    fn.__fmx_guard__ = guard
    return fn, None


def zero_loc_block(node):
    """The top-level blocks LOC counts as zero lines never run: a `def tap`
    (fmx supplies tap) and an `if __name__ == "__main__":` block (either
    order), so no code can hide in them."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "tap":
        return True
    if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
            len(node.test.ops) == 1 and isinstance(node.test.ops[0], ast.Eq):
        sides = [node.test.left, node.test.comparators[0]]
        names = [x for x in sides if isinstance(x, ast.Name) and x.id == "__name__"]
        mains = [x for x in sides if isinstance(x, ast.Constant) and x.value == "__main__"]
        return bool(names and mains)
    return False


def check_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in ALLOWED_MODULES:
                    return node, alias.name
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level or mod not in ALLOWED_MODULES:
                return node, "." * node.level + mod
    return None


def candidate_builtins():
    import builtins
    b = dict(vars(builtins))

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        # torch imports its own modules lazily through the caller's builtins
        # (torch.tensor(list) imports torch.storage): those, and the stdlib
        # helpers they use, pass; anything else a file reaches for does not
        top = name.split(".")[0]
        if level or (top not in INTERNAL_MODULES and not top.startswith("_")):
            raise ImportError(f"import of '{name}' is not allowed in an fmx file")
        return __import__(name, globals, locals, fromlist, level)
    b["__import__"] = guarded_import
    for name in ("open", "input", "breakpoint", "exit", "quit", "help"):
        b.pop(name, None)
    return b


class CodeGuard:
    """What LOC counts is what runs: once armed, code the file did not hold
    in its own source is refused (tools/adversarial: exec of a string, a
    docstring or a comment read back from memory). An audit hook (permanent:
    a candidate cannot remove it) catches Python's dynamic code — compile,
    exec and eval of strings, code and function objects made at run time —
    and ctypes called from the candidate's frames; TorchScript's compilers
    (`torch.jit.script`, `CompilationUnit`, ...) are replaced by refusals in
    every loaded module. A caught attempt raises in the candidate and fails
    the evaluation even if the candidate catches the exception (`violation`).
    Imports torch makes lazily (their code objects come from files) pass."""

    EVENTS = {"compile", "exec", "code.__new__", "function.__new__", "marshal.loads",
              "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function",
              "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at", "ctypes.wstring_at",
              "ctypes.addressof", "ctypes.create_string_buffer"}

    def __init__(self, filename):
        self.filename = filename
        self.armed = False
        self.violation = None
        self.module_code = None

    def install(self, torch):
        sys.addaudithook(self.hook)
        self.refuse_torchscript(torch)

    def refuse_torchscript(self, torch):
        jit = torch.jit
        originals = {id(o): name for name, o in [
            ("torch.jit.script", getattr(jit, "script", None)),
            ("torch.jit.trace", getattr(jit, "trace", None)),
            ("torch.jit.trace_module", getattr(jit, "trace_module", None)),
            ("torch.jit.script_method", getattr(jit, "script_method", None)),
            ("torch.jit.CompilationUnit", getattr(jit, "CompilationUnit", None)),
            ("torch.jit.compile", getattr(jit, "compile", None)),
            ("torch._C.CompilationUnit", getattr(torch._C, "CompilationUnit", None)),
            ("torch._C._jit_script_compile", getattr(torch._C, "_jit_script_compile", None)),
            ("torch._C._jit_script_class_compile",
             getattr(torch._C, "_jit_script_class_compile", None)),
            ("torch.compile", getattr(torch, "compile", None))] if o is not None}
        stubs = {}

        def stub_for(name):
            def refused(*args, **kwargs):
                self.refuse(f"{name}() compiles code at run time")
            return refused
        for mod in list(sys.modules.values()):
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict):
                continue
            for key, value in list(d.items()):
                name = originals.get(id(value))
                if name is not None:
                    d[key] = stubs.setdefault(name, stub_for(name))

    def from_candidate(self, depth):
        frame = sys._getframe(depth)
        return frame is not None and frame.f_code.co_filename == self.filename

    def hook(self, event, args):
        if not self.armed or event not in self.EVENTS:
            return
        if event == "exec" and args and args[0] is self.module_code:
            self.module_code = None  # fmx's own exec of the file, once
            return
        if event == "compile":
            where = args[1] if len(args) > 1 else ""
            if isinstance(where, bytes):
                where = where.decode(errors="replace")
            if self.from_candidate(2) or not self.real_file(where):
                self.refuse(f"compile()/exec()/eval() of a string ({where})")
        elif event == "exec":
            code = args[0] if args else None
            where = getattr(code, "co_filename", "")
            if self.from_candidate(2) or where == self.filename or not self.real_file(where):
                self.refuse("exec()/eval() of a code object")
        elif event in ("code.__new__", "function.__new__", "marshal.loads"):
            if self.from_candidate(2):
                self.refuse(f"{event.replace('.__new__', '()')} made at run time")
        elif self.from_candidate(2):  # ctypes: raw memory and foreign calls
            self.refuse(f"ctypes ({event})")

    @staticmethod
    def real_file(where):
        return bool(where) and not where.startswith("<") and os.path.isabs(where)

    def refuse(self, what):
        if self.violation is None:
            line = ""
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename == self.filename:
                    line = f"{self.filename}:{frame.f_lineno}: "
                    break
                frame = frame.f_back
            self.violation = (f"{line}{what}: an fmx file runs only the code it holds (LOC is "
                              "counted on the file's source, so code built from strings, "
                              "comments or data at run time is not allowed); write it in the file")
        raise RuntimeError(self.violation)


class TapRecorder:
    """tap(name, x): the identity, recording a copy of x (at most max_taps per
    call and max_bytes in all; the rest are counted, not kept)."""

    def __init__(self, max_taps, max_bytes):
        self.max_taps, self.max_bytes = max_taps, max_bytes or (256 << 20)
        self.taps, self.cut, self.bytes = [], 0, 0

    def __call__(self, name, x):
        if hasattr(x, "detach") and len(self.taps) < self.max_taps:
            nbytes = x.numel() * x.element_size()
            if self.bytes + nbytes <= self.max_bytes:
                self.taps.append((str(name), x.detach().clone()))
                self.bytes += nbytes
                return x
        self.cut += 1
        return x

    def reset(self):
        self.taps, self.cut = [], 0


# ---- running a call ----

def weights_param(sig, inputs):
    """The parameter that receives the weights dict: one annotated as a dict
    (Dict[str, Tensor], dict, Mapping), else the one unannotated parameter
    without a default that is no input of the module."""
    params = [p for p in sig.parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for p in params:
        if p.annotation is not p.empty:
            text = p.annotation if isinstance(p.annotation, str) else repr(p.annotation)
            if p.annotation is dict or text.replace("typing.", "").startswith(
                    ("Dict", "dict", "Mapping", "MutableMapping")):
                return p.name
    rest = [p for p in params if p.name not in inputs and p.default is p.empty
            and p.annotation is p.empty]
    return rest[0].name if len(rest) == 1 else None


def listed_inputs(inputs):
    """NAME -> [the inputs NAME_0, NAME_1, ...] for every run of tensor inputs so numbered from 0
    (a flattened list: a decode step's past_keys), which a parameter NAME receives as a list."""
    out = {}
    for name in inputs:
        base, _, index = name.rpartition("_")
        if base and index == "0" and base not in inputs:
            run = []
            while inputs.get(f"{base}_{len(run)}", {}).get("kind") == "tensor":
                run.append(inputs[f"{base}_{len(run)}"])
            if run:
                out[base] = run
    return out


def flat_outputs(out, torch):
    """The tensors a call returned, in order: a Tensor, or a tuple/list of Tensors and of
    lists of Tensors (a decode step's (logits, keys, values)), flattened; None if not that."""
    if isinstance(out, torch.Tensor):
        return [out]
    if not isinstance(out, (tuple, list)):
        return None
    flat = []
    for o in out:
        if isinstance(o, torch.Tensor):
            flat.append(o)
        elif isinstance(o, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in o):
            flat.extend(o)
        else:
            return None
    return flat


def bind(job, fn, call, tensors, weights_for):
    entry = job.get("entry") or "forward"
    cls = job.get("module_class") or "the module"
    component = job.get("component") or ""
    sig = inspect.signature(fn)
    inputs = {i["name"]: i for i in call.get("inputs", [])}
    lists = listed_inputs(inputs)
    wname = weights_param(sig, {**inputs, **lists})
    kwargs = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.POSITIONAL_ONLY:
            raise LoadError(f"parameter '{p.name}' of {entry}() is positional-only; fmx passes "
                            "the module's inputs by name")
        if p.name == wname:
            kwargs[p.name] = weights_for(call.get("dtype", job.get("pack_dtype", "float32")))
            continue
        inp = inputs.get(p.name)
        if inp is None and p.name in lists:  # NAME_0, NAME_1, ... passed whole, as a list
            kwargs[p.name] = [tensors[i["tensor"]] for i in lists[p.name]]
            continue
        if inp is None:
            if p.default is not p.empty:
                continue
            names = ", ".join(inputs) or "(none)"
            raise LoadError(f"parameter '{p.name}' of {entry}() is not an input of {cls} "
                            f"('{component}'); its inputs are: {names}; weights come in a "
                            "Dict[str, Tensor] parameter")
        kind = inp.get("kind")
        if kind == "tensor":
            kwargs[p.name] = tensors[inp["tensor"]]
        elif kind == "value":
            kwargs[p.name] = typed_value(inp)
        elif kind == "none":
            kwargs[p.name] = None
        elif p.default is p.empty:
            what = "a cache" if kind == "cache" else "an object"
            raise LoadError(f"parameter '{p.name}' of {entry}() is input '{p.name}' of {cls}, "
                            f"which is {what}; fmx does not pass it (give the parameter a "
                            "default)")
    return kwargs


def run_call(job, fn, call, tensors, weights_for, results):
    import torch
    entry = job.get("entry") or "forward"
    filename = job.get("filename") or "candidate.py"
    taps = fn.__fmx_taps__
    taps.reset()
    try:
        kwargs = bind(job, fn, call, tensors, weights_for)
    except LoadError as e:
        return {"ok": False, "stage": "bind", "error": str(e)}
    device = job.get("device") or "cpu"
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn(**kwargs)
            if device != "cpu":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1000.0
    except MemoryError:
        return {"ok": False, "stage": "run", "error": "out of memory (MemoryError)"}
    except BaseException as e:  # noqa: BLE001 — the candidate's error
        return {"ok": False, "stage": "run", "error": fn.__fmx_guard__.violation or
                describe_error(e, filename, job["code"].splitlines())}
    if fn.__fmx_guard__.violation:
        return {"ok": False, "stage": "run", "error": fn.__fmx_guard__.violation}
    outs = flat_outputs(out, torch)
    if outs is None:
        what = type(out).__name__
        if isinstance(out, (tuple, list)):
            bad = next(i for i, o in enumerate(out) if not isinstance(o, torch.Tensor))
            what = f"a {type(out).__name__} whose item {bad} is {type(out[bad]).__name__}"
        return {"ok": False, "stage": "run", "error":
                f"{entry}() returned {what}; return a Tensor or a tuple of Tensors (the "
                "module's tensor outputs, in order; lists of Tensors in it are flattened)"}
    try:
        res = {"ok": True, "ms": ms, "outputs": [results.blob(o) for o in outs]}
        res["taps"] = [dict(results.blob(t), name=name) for name, t in taps.taps]
    except (TypeError, MemoryError) as e:
        return {"ok": False, "stage": "run", "error": f"{entry}() returned {e}"}
    if taps.cut:
        res["taps_cut"] = taps.cut
    return res


# ---- errors a policy can act on ----

def located(filename, line, col, lines, message):
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    out = f"{filename}:{line}:{col + 1}: {message}"
    if text.strip():
        out += f"\n    {text.strip()}"
    return out


def describe_error(exc, filename, lines):
    """FILE:LINE:COL: Type: message, the line's text, the tensors it names
    (shape, dtype) and the chain of the candidate's calls."""
    message = f"{type(exc).__name__}: {exc}"
    body = message.splitlines()
    if len(body) > 12:
        body = body[:12] + ["..."]
    message = "\n".join(body)[:2000]
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            frames.append(tb)
        tb = tb.tb_next
    if not frames:
        return f"{filename}: {message}"
    last = frames[-1]
    line = last.tb_lineno
    col = 0
    try:
        pos = list(last.tb_frame.f_code.co_positions())[last.tb_lasti // 2]
        if pos[0] == line and pos[2] is not None:
            col = pos[2]
    except (AttributeError, IndexError, TypeError):
        pass
    local = last.tb_frame.f_locals
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        message += near_keys(exc.args[0], local)
    out = located(filename, line, col, lines, message)
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    shapes = []
    for name in identifiers(text):
        v = local.get(name)
        if hasattr(v, "shape") and hasattr(v, "dtype") and len(shapes) < 8:
            shapes.append(f"{name}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}")
    if shapes:
        out += "\n    where " + "; ".join(shapes)
    if len(frames) > 1:
        chain = [f"{f.tb_frame.f_code.co_name}() line {f.tb_lineno}" for f in frames]
        out += "\n    called from " + " <- ".join(reversed(chain[:-1]))
    return out


def near_keys(key, local):
    """For a KeyError in a dict of tensors (the weights): the keys it does have that are
    nearest to `key`, as a sentence to append to the error."""
    for value in local.values():
        if isinstance(value, dict) and value and key not in value and \
                all(isinstance(k, str) for k in value) and \
                any(hasattr(v, "shape") for v in value.values()):
            near = difflib.get_close_matches(key, list(value), n=3, cutoff=0.5)
            if not near:  # the same last part under another prefix ("self_attn.q_proj.weight")
                near = [k for k in value if k.endswith("." + key.rsplit(".", 1)[-1])][:3]
            names = ", ".join(repr(k) for k in near) if near else "none near it"
            return f" (no such weight; nearest of the {len(value)} keys: {names})"
    return ""


def identifiers(text):
    seen = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text.strip() + "\n").readline):
            if tok.type == tokenize.NAME and tok.string not in seen:
                seen.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return seen


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = {"--zygote": None, "--engine": None, "--threads": "1", "--device": "cpu"}
    while argv:
        k = argv.pop(0)
        if k not in opts or not argv:
            sys.stderr.write("usage: python3 -m fmx.evaluate --zygote FD --engine SO "
                             "[--threads N] [--device D]\n")
            return 2
        opts[k] = argv.pop(0)
    if opts["--zygote"] is None or opts["--engine"] is None:
        sys.stderr.write("fmx.evaluate: --zygote and --engine are required\n")
        return 2
    zygote(int(opts["--zygote"]), opts["--engine"], int(opts["--threads"]), opts["--device"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
