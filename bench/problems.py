"""Benchmark problems: benchdnn-style convolution strings and the ResNet-50 v1.5 layer list.

A problem string names a forward convolution as oneDNN's benchdnn does, for example
``mb1ic64ih56oc64kh3sh1ph1``. Keys are read left to right, each a lowercase name and a
number; ``_`` separators and a trailing ``n"name"`` are accepted. Missing keys take
benchdnn's defaults: ``mb2 g1``; ``iw = ih``, ``kw = kh``, ``sw = sh``, ``pw = ph``,
``dw = dh``; strides 1, padding 0, dilation 0 (benchdnn counts dilation from 0, so ``dh1``
means a dilation of 2 in PyTorch's terms); ``oh``/``ow`` are computed when absent, checked
when present.

Run ``python bench/problems.py`` for the self-check.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path

BENCHDNN_DEFAULT_MB = 2

_KEYS = ("mb", "g", "ic", "ih", "iw", "oc", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")
_TOKEN = re.compile(r"([a-z]+)(\d+)")
_NAME = re.compile(r'_?n"([^"]*)"$|_?n([A-Za-z][\w.-]*)$')


@dataclass(frozen=True)
class ConvProblem:
    """A 2-D forward convolution, in benchdnn's terms (dh/dw count from 0)."""

    ic: int
    ih: int
    iw: int
    oc: int
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    ph: int = 0
    pw: int = 0
    dh: int = 0
    dw: int = 0
    mb: int = BENCHDNN_DEFAULT_MB
    g: int = 1
    name: str = ""

    @property
    def oh(self) -> int:
        return (self.ih + 2 * self.ph - ((self.kh - 1) * (self.dh + 1) + 1)) // self.sh + 1

    @property
    def ow(self) -> int:
        return (self.iw + 2 * self.pw - ((self.kw - 1) * (self.dw + 1) + 1)) // self.sw + 1

    @property
    def stride(self) -> tuple[int, int]:
        return (self.sh, self.sw)

    @property
    def padding(self) -> tuple[int, int]:
        return (self.ph, self.pw)

    @property
    def dilation(self) -> tuple[int, int]:
        """PyTorch's dilation (benchdnn's + 1)."""
        return (self.dh + 1, self.dw + 1)

    def with_mb(self, mb: int) -> ConvProblem:
        return replace(self, mb=mb)

    def flops(self, mb: int | None = None) -> int:
        """Nominal forward flops, 2*N*K*C*R*S*P*Q (groups divide C)."""
        n = self.mb if mb is None else mb
        return 2 * n * self.oc * (self.ic // self.g) * self.kh * self.kw * self.oh * self.ow

    def input_shape(self, mb: int | None = None) -> tuple[int, int, int, int]:
        return (self.mb if mb is None else mb, self.ic, self.ih, self.iw)

    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.oc, self.ic // self.g, self.kh, self.kw)

    def to_string(self, mb: int | None = None) -> str:
        """The canonical benchdnn string, with mb and oh always written (as the C++ ConvDesc does)."""
        s = f"mb{self.mb if mb is None else mb}"
        if self.g != 1:
            s += f"g{self.g}"
        s += f"ic{self.ic}ih{self.ih}"
        if self.iw != self.ih:
            s += f"iw{self.iw}"
        s += f"oc{self.oc}oh{self.oh}"
        if self.ow != self.oh:
            s += f"ow{self.ow}"
        s += f"kh{self.kh}"
        if self.kw != self.kh:
            s += f"kw{self.kw}"
        s += f"sh{self.sh}"
        if self.sw != self.sh:
            s += f"sw{self.sw}"
        s += f"ph{self.ph}"
        if self.pw != self.ph:
            s += f"pw{self.pw}"
        if self.dh or self.dw:
            s += f"dh{self.dh}"
            if self.dw != self.dh:
                s += f"dw{self.dw}"
        return s


def parse_problem(text: str) -> ConvProblem:
    """A benchdnn-style problem string -> ConvProblem, with benchdnn's defaults."""
    s = text.strip()
    name = ""
    m = _NAME.search(s)
    if m:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        s = s[: m.start()]
    s = s.replace("_", "")
    fields: dict[str, int] = {}
    pos = 0
    for tok in _TOKEN.finditer(s):
        if tok.start() != pos:
            break
        key, value = tok.group(1), int(tok.group(2))
        if key not in _KEYS:
            raise ValueError(f"problem {text!r}: unknown key {key!r}; accepted keys are {', '.join(_KEYS)}")
        if key in fields:
            raise ValueError(f"problem {text!r}: key {key!r} given twice")
        fields[key] = value
        pos = tok.end()
    if pos != len(s):
        raise ValueError(f"problem {text!r}: cannot parse {s[pos:]!r}; expected keys such as ic64ih56oc64kh3sh1ph1")
    for key in ("ic", "oc"):
        if key not in fields:
            raise ValueError(f"problem {text!r}: {key!r} is required")
    kh = fields.get("kh", 1)
    sh = fields.get("sh", 1)
    ph = fields.get("ph", 0)
    dh = fields.get("dh", 0)
    if "ih" not in fields:
        if "oh" not in fields:
            raise ValueError(f"problem {text!r}: give 'ih' (or 'oh' to derive it)")
        fields["ih"] = (fields["oh"] - 1) * sh - 2 * ph + (kh - 1) * (dh + 1) + 1
    ih = fields["ih"]
    if "iw" not in fields and "ow" in fields and "oh" in fields and fields["ow"] != fields["oh"]:
        kw, sw, pw, dw = (fields.get(k, d) for k, d in (("kw", kh), ("sw", sh), ("pw", ph), ("dw", dh)))
        fields["iw"] = (fields["ow"] - 1) * sw - 2 * pw + (kw - 1) * (dw + 1) + 1
    p = ConvProblem(
        ic=fields["ic"],
        ih=ih,
        iw=fields.get("iw", ih),
        oc=fields["oc"],
        kh=kh,
        kw=fields.get("kw", kh),
        sh=sh,
        sw=fields.get("sw", sh),
        ph=ph,
        pw=fields.get("pw", ph),
        dh=dh,
        dw=fields.get("dw", dh),
        mb=fields.get("mb", BENCHDNN_DEFAULT_MB),
        g=fields.get("g", 1),
        name=name,
    )
    if min(p.mb, p.g, p.ic, p.ih, p.iw, p.oc, p.kh, p.kw, p.sh, p.sw) < 1 or min(p.ph, p.pw, p.dh, p.dw) < 0:
        raise ValueError(f"problem {text!r}: sizes, strides and groups must be >= 1, padding and dilation >= 0")
    if p.ic % p.g or p.oc % p.g:
        raise ValueError(f"problem {text!r}: groups g{p.g} must divide ic{p.ic} and oc{p.oc}")
    if p.oh < 1 or p.ow < 1:
        raise ValueError(f"problem {text!r}: the kernel does not fit the padded input (output {p.oh}x{p.ow})")
    for key, got in (("oh", p.oh), ("ow", p.ow)):
        if key in fields and fields[key] != got:
            raise ValueError(f"problem {text!r}: {key}{fields[key]} does not match the computed {key}{got}")
    return p


@dataclass(frozen=True)
class Layer:
    """One distinct convolution of a network, and how often it occurs there."""

    id: str
    name: str
    problem: str
    count: int

    @property
    def conv(self) -> ConvProblem:
        return parse_problem(self.problem)


# ResNet-50 v1.5 (torchvision's resnet50): the 23 distinct conv shapes and their counts (53
# convs). Kept here so the benchmark runs without ../shared; check_against_file() compares.
RESNET50_LAYERS: tuple[Layer, ...] = (
    Layer("L01", "conv1", "ic3ih224oc64kh7sh2ph3", 1),
    Layer("L02", "res2a_1x1a", "ic64ih56oc64kh1sh1ph0", 1),
    Layer("L03", "res2_3x3", "ic64ih56oc64kh3sh1ph1", 3),
    Layer("L04", "res2_1x1c", "ic64ih56oc256kh1sh1ph0", 4),
    Layer("L05", "res2_1x1a", "ic256ih56oc64kh1sh1ph0", 2),
    Layer("L06", "res3a_1x1a", "ic256ih56oc128kh1sh1ph0", 1),
    Layer("L07", "res3a_3x3s2", "ic128ih56oc128kh3sh2ph1", 1),
    Layer("L08", "res3_1x1c", "ic128ih28oc512kh1sh1ph0", 4),
    Layer("L09", "res3a_proj", "ic256ih56oc512kh1sh2ph0", 1),
    Layer("L10", "res3_1x1a", "ic512ih28oc128kh1sh1ph0", 3),
    Layer("L11", "res3_3x3", "ic128ih28oc128kh3sh1ph1", 3),
    Layer("L12", "res4a_1x1a", "ic512ih28oc256kh1sh1ph0", 1),
    Layer("L13", "res4a_3x3s2", "ic256ih28oc256kh3sh2ph1", 1),
    Layer("L14", "res4_1x1c", "ic256ih14oc1024kh1sh1ph0", 6),
    Layer("L15", "res4a_proj", "ic512ih28oc1024kh1sh2ph0", 1),
    Layer("L16", "res4_1x1a", "ic1024ih14oc256kh1sh1ph0", 5),
    Layer("L17", "res4_3x3", "ic256ih14oc256kh3sh1ph1", 5),
    Layer("L18", "res5a_1x1a", "ic1024ih14oc512kh1sh1ph0", 1),
    Layer("L19", "res5a_3x3s2", "ic512ih14oc512kh3sh2ph1", 1),
    Layer("L20", "res5_1x1c", "ic512ih7oc2048kh1sh1ph0", 3),
    Layer("L21", "res5a_proj", "ic1024ih14oc2048kh1sh2ph0", 1),
    Layer("L22", "res5_1x1a", "ic2048ih7oc512kh1sh1ph0", 2),
    Layer("L23", "res5_3x3", "ic512ih7oc512kh3sh1ph1", 2),
)

SHARED_LAYERS_FILE = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "resnet50_layers.txt"


def parse_layers_file(path: str | Path) -> list[Layer]:
    """Reads the peers' table: `id name C K H W R S stride pad count` per line, '#' comments."""
    layers = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 11:
            raise ValueError(
                f"{path}:{lineno}: expected 11 fields (id name C K H W R S stride pad count), got {line!r}"
            )
        lid, name = parts[0], parts[1]
        c, k, h, w, r, s, stride, pad, count = (int(v) for v in parts[2:])
        problem = f"ic{c}ih{h}" + (f"iw{w}" if w != h else "") + f"oc{k}kh{r}" + (f"kw{s}" if s != r else "")
        problem += f"sh{stride}ph{pad}"
        layers.append(Layer(lid, name, problem, count))
    return layers


def check_against_file(path: str | Path = SHARED_LAYERS_FILE) -> list[str]:
    """Differences between RESNET50_LAYERS and the peers' file (empty when they agree)."""
    theirs = parse_layers_file(path)
    diffs = []
    if len(theirs) != len(RESNET50_LAYERS):
        diffs.append(f"{path} has {len(theirs)} layers, the in-repo list {len(RESNET50_LAYERS)}")
    for mine, other in zip(RESNET50_LAYERS, theirs, strict=False):
        if (mine.id, mine.name, mine.conv, mine.count) != (other.id, other.name, other.conv, other.count):
            diffs.append(f"{mine} != {other}")
    return diffs


def select_layers(spec: str | None) -> list[Layer]:
    """'L03,L04' (ids or names, comma-separated) -> those layers in network order; None -> all."""
    if not spec:
        return list(RESNET50_LAYERS)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {layer.id.lower(): layer for layer in RESNET50_LAYERS} | {
        layer.name.lower(): layer for layer in RESNET50_LAYERS
    }
    missing = [w for w in wanted if w.lower() not in known]
    if missing:
        raise ValueError(f"unknown layer(s) {', '.join(missing)}; expected ids L01..L23 or names such as res2_3x3")
    picked = {known[w.lower()].id for w in wanted}
    return [layer for layer in RESNET50_LAYERS if layer.id in picked]


def _self_check() -> None:
    p = parse_problem("mb1ic64ih56oc64kh3sh1ph1")
    assert (p.mb, p.ic, p.ih, p.iw, p.oc, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw) == (
        1,
        64,
        56,
        56,
        64,
        3,
        3,
        1,
        1,
        1,
        1,
        0,
        0,
    ), p
    assert (p.oh, p.ow) == (56, 56) and p.to_string() == "mb1ic64ih56oc64oh56kh3sh1ph1"
    assert p.flops() == 2 * 64 * 64 * 9 * 56 * 56
    d = parse_problem("ic3ih224oc64kh7sh2ph3")
    assert d.mb == BENCHDNN_DEFAULT_MB and (d.oh, d.ow, d.g) == (112, 112, 1)
    full = parse_problem('g1mb1_ic3ih224iw224_oc64oh112ow112_kh7kw7_sh2sw2_ph3pw3_n"resnet18_0"')
    assert full.name == "resnet18_0" and full.with_mb(2) == replace(d, name="resnet18_0")
    r = parse_problem("ic16ih10iw12oc8kh3kw1sh2sw1ph1pw0dh1")
    assert (r.iw, r.kw, r.sw, r.pw, r.dw, r.dilation) == (12, 1, 1, 0, 1, (2, 2))
    assert (r.oh, r.ow) == ((10 + 2 - 5) // 2 + 1, 12), (r.oh, r.ow)
    assert parse_problem(r.to_string()) == replace(r, name="")
    assert parse_problem("ic8oh7oc8kh3ph1").ih == 7
    for bad in ("ic8ih8", "ic8ih8oc8kh3xx1", "ic8ih8oc8oh9", "ic8ih2oc8kh5", "ic8ih8oc8ih9", "ic8 ih8"):
        try:
            parse_problem(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} should not parse")
    assert len(RESNET50_LAYERS) == 23 and sum(layer.count for layer in RESNET50_LAYERS) == 53
    assert [layer.id for layer in select_layers("L04,res2_3x3")] == ["L03", "L04"]
    if SHARED_LAYERS_FILE.exists():
        diffs = check_against_file()
        assert not diffs, "\n".join(diffs)
        print(f"in-repo layer list matches {SHARED_LAYERS_FILE}")
    print("problems.py: self-check passed")


def add_run_args(ap, isa_help: str = "cap the JIT's ISA") -> None:
    """The options both benchmarks take: --threads, --batch, --quick and --isa-cap."""
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument(
        "--batch",
        choices=("latency", "throughput", "both"),
        default="both",
        help="latency: N=1; throughput: N=2 x threads (default: both)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer, shorter samples: a smoke run, not a measurement")
    ap.add_argument("--isa-cap", choices=("avx2", "avx512", "avx512_bf16", "amx"), default=None, help=isa_help)


def parse_model_run_args(ap, argv: list[str] | None, iters: tuple[int, int], out: Path) -> argparse.Namespace:
    """The run options of add_run_args, plus --iters (iters[0], or iters[1] with --quick) and --out, parsed
    and checked; for the whole-model benchmarks."""
    add_run_args(ap)
    ap.add_argument(
        "--iters", type=int, default=None, help=f"timed iterations per variant (default {iters[0]}, --quick {iters[1]})"
    )
    ap.add_argument("--out", type=Path, default=out, help=f"output directory (default: {out})")
    args = ap.parse_args(argv)
    check_run_args(ap, args)
    if args.iters is None:
        args.iters = iters[1] if args.quick else iters[0]
    if args.iters < 1:
        ap.error(f"--iters: expected >= 1, got {args.iters}")
    return args


def check_run_args(ap, args) -> None:
    if min(args.threads) < 1:
        ap.error(f"--threads: expected counts >= 1, got {args.threads}")


def batch_sizes(batch: str, threads: int) -> list[int]:
    """N = 1 (latency) and N = 2 x threads (throughput)."""
    return {"latency": [1], "throughput": [2 * threads], "both": [1, 2 * threads]}[batch]


if __name__ == "__main__":
    _self_check()
