r"""Where a workload's step time goes, op by op: ours (XLA's executed ops) next to PyTorch's.

    python benchmarks/profile_ops.py --workload vae_encode --threads 1
    python benchmarks/profile_ops.py --workload deid_train --threads 1 --top 30
    python benchmarks/profile_ops.py --workload unet_forward --profile cpu --quick      # the test runs this

Builds the workload exactly as benchmarks/suite.py times it (same builders, sizes, precision,
threads), runs ``--warmup`` steps, then ``--steps`` steps under each framework's profiler:

  * JAX: ``jax.profiler`` trace; every executed XLA op (a thunk of the CPU runtime: a fusion, a
    convolution, a YNNPACK fusion, ...) is one event carrying its HLO module and op name.  The
    optimised HLO of every module is dumped (``--xla_dump_to``, a temporary folder) to name each
    op's output shape and the source line it came from (``op_name`` metadata: the flax module
    path and the jax primitive, e.g. ``encoder/down_blocks_0/resnets_0/conv1/conv_general_dilated``).
  * PyTorch: ``torch.profiler`` self time per aten op and input shapes.

Per-op times are summed over the steps and divided by ``--steps`` (ms per step; with several
threads an op's time is the sum over its threads).  Each op also gets a kind, the same
vocabulary for both frameworks: conv (convolutions, forward and backward, and im2col's
matmul), matmul (dense layers, attention products), norm (GroupNorm / LayerNorm / BatchNorm
and their gradients), elementwise (activations, adds, optimizer updates, ...), data (copies,
pads, concatenations, transposes), other.  XLA's loops (while, conditional, call) are not rows:
the ops of their bodies are.  JAX kinds come from the op's source (the primitive,
and ``norm`` in the module path); PyTorch's from the aten op's name.

The Markdown report (``--out``, default benchmarks/results/ops_<workload>.md) has the kinds side
by side and the ``--top`` ops of each framework.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

KINDS = ("conv", "matmul", "norm", "elementwise", "data", "other")

# --- JAX ----------------------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\(")
_TUPLE_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)) (while|conditional|call|fusion|custom-call)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTROL_FLOW = ("while", "conditional", "call")
_DATA_OPS = ("copy", "transpose", "concatenate", "pad", "slice", "dynamic-slice", "dynamic-update-slice",
             "broadcast", "reshape", "bitcast", "gather", "scatter", "reverse", "iota", "constant")
_DATA_PRIMITIVES = ("concatenate", "pad", "slice", "dynamic_slice", "dynamic_update_slice", "transpose", "reshape",
                    "broadcast_in_dim", "gather", "scatter", "scatter-add", "scatter_add", "rev", "copy", "squeeze",
                    "expand_dims", "select_n", "convert_element_type")


def read_hlo_dump(folder: str) -> dict:
    """{(module number, op name): (shape, opcode, op_name metadata)} from ``--xla_dump_to`` text files."""
    table = {}
    for path in glob.glob(os.path.join(folder, "module_*.cpu_after_optimizations.txt")) + \
            glob.glob(os.path.join(folder, "module_*.gpu_after_optimizations.txt")):
        number = int(os.path.basename(path).split(".")[0].split("_")[1])
        for line in open(path):
            m = _INSTRUCTION.match(line) or _TUPLE_INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, opcode = m.groups()
            meta = _OP_NAME.search(line)
            table[(number, name)] = (shape, opcode, meta.group(1) if meta else "")
    return table


def jax_kind(opcode: str, op_name: str) -> str:
    """The kind of an executed XLA op from its opcode and the primitive/module path it came from."""
    parts = [p for p in op_name.split("/") if p]
    primitive = parts[-1] if parts else ""
    modules = parts[:-1]
    if opcode == "convolution" or primitive.startswith("conv_general_dilated"):
        return "conv"
    if any(re.fullmatch(r"(norm\w*|\w*_norm\w*|ln_\w+|bn\w*|layer_norm\w*|group_norm\w*)", m) for m in modules):
        return "norm"
    if opcode == "dot" or primitive.startswith("dot_general"):
        # im2col's matmul sits under the conv module it lowers (conv.py), a dense layer's under its own.
        return "conv" if modules and re.fullmatch(r"(conv\w*|stem|downsamplers_\d+|upsamplers_\d+)", modules[-1]) else "matmul"
    if opcode in _DATA_OPS or primitive in _DATA_PRIMITIVES:
        return "data"
    if opcode in ("fusion", "custom-call") or primitive:
        return "elementwise"
    return "other"


def profile_jax(step, sync, steps: int, dump_dir: str, trace_dir: str) -> list[dict]:
    """Per-op rows {name, shape, source, kind, ms} (ms per step) of ``steps`` calls of ``step``."""
    import jax
    from jax.profiler import ProfileData

    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        sync(step())
    jax.profiler.stop_trace()
    hlo = read_hlo_dump(dump_dir)
    totals, meta = collections.Counter(), {}
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" not in stats:
                        continue
                    key = (int(stats.get("program_id", -1)), stats["hlo_op"])
                    totals[key] += event.duration_ns
                    meta[key] = stats.get("hlo_module", "")
    rows = []
    for (program, op), ns in totals.items():
        shape, opcode, op_name = hlo.get((program, op), ("?", "?", ""))
        if opcode in _CONTROL_FLOW:  # its body's ops are events of their own: counting it too would count twice
            continue
        rows.append({"name": op, "module": meta[(program, op)], "shape": shape, "source": op_name,
                     "kind": jax_kind(opcode, op_name), "ms": ns / 1e6 / steps})
    return sorted(rows, key=lambda r: -r["ms"])


# --- PyTorch ------------------------------------------------------------------------------------

_TORCH_KINDS = [
    ("conv", r"conv|mkldnn_convolution|slow_conv"),
    ("norm", r"norm"),
    ("matmul", r"addmm|\bmm\b|bmm|matmul|linear|baddbmm|scaled_dot_product|_flash_attention|attention|einsum|\bdot\b"),
    ("data", r"copy|cat\b|pad|slice|transpose|permute|contiguous|clone|view|reshape|expand|index|gather|scatter|"
             r"stack|empty|zeros|ones|fill|repeat|upsample|interpolate|to\b|_to_copy|flatten|unfold|select|narrow|"
             r"split|chunk|as_strided|t\b|resize|detach|set_"),
]


def torch_kind(name: str) -> str:
    op = name.split("::")[-1]
    for kind, pattern in _TORCH_KINDS:
        if re.search(pattern, op):
            return kind
    return "elementwise" if name.startswith("aten::") else "other"


def profile_torch(step, sync, steps: int) -> list[dict]:
    """Per-op rows (aten op + input shapes; self CPU or CUDA time per step)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            sync(step())
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        device_us = getattr(e, "self_device_time_total", 0) or 0
        us = device_us if device_us else e.self_cpu_time_total
        if us <= 0 or not e.key.startswith("aten::"):
            continue
        shapes = ", ".join(str(tuple(s)) for s in (e.input_shapes or []) if s)
        rows.append({"name": e.key, "module": "", "shape": shapes[:60], "source": f"{e.count // steps} call(s)/step",
                     "kind": torch_kind(e.key), "ms": us / 1e3 / steps})
    return sorted(rows, key=lambda r: -r["ms"])


# --- Report -------------------------------------------------------------------------------------


def by_kind(rows) -> dict:
    out = dict.fromkeys(KINDS, 0.0)
    for r in rows:
        out[r["kind"]] += r["ms"]
    return out


def markdown(workload: str, label: str, header: list[str], jax_rows, torch_rows, top: int) -> str:
    jk, tk = by_kind(jax_rows), by_kind(torch_rows)
    lines = [f"# Op profile: `{workload}` ({label})", ""] + header + ["",
             "| kind | JAX ms/step | PyTorch ms/step | JAX/PyTorch |", "|---|---|---|---|"]
    for k in KINDS + ("total",):
        a = sum(jk.values()) if k == "total" else jk[k]
        b = sum(tk.values()) if k == "total" else tk[k]
        ratio = f"{a / b:.2f}" if b > 0 else "-"
        lines.append(f"| {k} | {a:.2f} | {b:.2f} | {ratio} |")
    for title, rows in (("JAX (XLA ops)", jax_rows), ("PyTorch (aten ops, self time)", torch_rows)):
        lines += ["", f"## {title}: top {top}", "", "| ms/step | kind | op | shape | source |", "|---|---|---|---|---|"]
        for r in rows[:top]:
            source = "/".join(r["source"].split("/")[-4:])
            lines.append(f"| {r['ms']:.2f} | {r['kind']} | {r['name']} | `{r['shape']}` | {source} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the suite's tiny sizes")
    parser.add_argument("--threads", type=int, help="cores for both frameworks (default: all in the affinity mask)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="Markdown report (default benchmarks/results/ops_<workload>[_quick].md)")
    parser.add_argument("--json", help="also write every op's row (both frameworks) to this JSON file")
    args = parser.parse_args(argv)

    import suite  # sets nothing at import; its builders are what the suite times

    if args.workload not in suite.WORKLOADS:
        parser.error(f"--workload must be one of {suite.WORKLOADS}")
    threads = suite.pin_threads(args.threads)
    work = tempfile.mkdtemp(prefix="profile_ops_")
    dump_dir, trace_dir = os.path.join(work, "hlo"), os.path.join(work, "trace")
    flags = os.environ.get("XLA_FLAGS", "")
    if args.quick:
        flags += " " + suite.QUICK_XLA_FLAGS
    os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text".strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("USE_TF", "0")  # transformers (under diffusers/peft) would load TensorFlow's profiler too

    import diffusers  # noqa: F401 - loaded before jax.profiler starts: a later first import crashed in its trace
    import jax
    import torch

    gpu = args.profile == "gpu"
    device = "cuda" if gpu else "cpu"
    torch.set_num_threads(threads)
    if not gpu:
        torch.set_flush_denormal(True)
    ctx = suite.Ctx(device=device, torch_compile=(), channels_last=gpu, gpu=gpu)
    spec = next(s for s in suite.profile_specs(args.profile, args.quick) if s.name == args.workload)
    results = {}
    for fw, builders in (("jax", suite.JAX_BUILDERS), ("torch", suite.TORCH_BUILDERS)):
        runner = builders[spec.name](spec, ctx)
        for _ in range(args.warmup + 1):
            runner.sync(runner.step())
        if fw == "jax":
            results[fw] = profile_jax(runner.step, runner.sync, args.steps, dump_dir, trace_dir)
        else:
            results[fw] = profile_torch(runner.step, runner.sync, args.steps)
        del runner
        suite.free_memory(ctx)
    info = suite.cpu_info()
    header = [f"- machine: {info['model']}, {threads} of {info['cores_total']} cores; JAX {jax.__version__} "
              f"({jax.default_backend()}), torch {torch.__version__}; XLA_FLAGS as given: `{flags.strip() or '-'}`",
              f"- `python benchmarks/profile_ops.py --workload {args.workload} --profile {args.profile}"
              f"{' --quick' if args.quick else ''} --threads {threads}`: {args.steps} profiled steps after "
              f"{args.warmup + 1} untimed; ms per step, summed over threads; profilers add a little per op",
              "- torch.compile off (eager PyTorch, as the cpu profile of the suite runs it)" if not gpu else
              "- torch.compile off here (an inductor graph would show as one op)"]
    text = markdown(args.workload, spec.label, header, results["jax"], results["torch"], args.top)
    print(text)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"ops_{args.workload}{'_quick' if args.quick else ''}.md"
    from mema_jax.fileio import atomic_write_bytes

    atomic_write_bytes(out, text.encode())
    print(f"wrote {out}")
    if args.json:
        import json

        atomic_write_bytes(Path(args.json), json.dumps(results, indent=1).encode())
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
