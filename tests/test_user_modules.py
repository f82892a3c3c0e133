"""The user's own modules (`file.py:Name`) in profile and compare: sibling imports, factories and
typed --set arguments, token inputs, the user's prints kept off stdout, and one-line errors that
name the file and line (a traceback with --debug)."""

from __future__ import annotations

import contextlib
import copy
import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from dlkit.cli import app
from dlkit.errors import IncompatibleError, UsageError
from dlkit.profiling.user_module import build_user_model, constructor_kwargs

runner = CliRunner()

# A nanoGPT-style model.py: a dataclass config, a tied LM head, prints while building and running.
MODEL = '''
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 97
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.n_embd)
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.proj = nn.Linear(c.n_embd, c.n_embd)
        self.ln2 = nn.LayerNorm(c.n_embd)
        self.fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.out = nn.Linear(4 * c.n_embd, c.n_embd)
        self.n_head = c.n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        print("number of parameters: %d" % sum(p.numel() for p in self.parameters()))

    def forward(self, idx, targets=None):
        b, t = idx.size()
        size = self.config.block_size
        assert t <= size, f"Cannot forward sequence of length {t}, block size is only {size}"
        print("forward pass on", t, "tokens")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss
'''

NANO = '''
from model import GPT, GPTConfig

print("nano.py loaded")


class Small(GPT):
    def __init__(self, n_layer: int = 2, n_embd: int = 16):
        super().__init__(GPTConfig(n_layer=n_layer, n_embd=n_embd))


def tiny(n_layer: int = 1, vocab=97):
    return GPT(GPTConfig(n_layer=n_layer, vocab_size=vocab))


if __name__ == "__main__":
    raise SystemExit("the script part never runs")
'''


def gpt_params(layers: int, e: int, vocab: int = 97, block: int = 32) -> int:
    """Hand count: tied token embedding, positions, per block 2 LayerNorms and 4 Linears, final norm."""
    per_block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
    return vocab * e + block * e + layers * per_block + 2 * e


def gpt_macs(layers: int, e: int, t: int, vocab: int = 97) -> int:
    """Per sequence of t tokens: 12 e^2 weight MACs per token and block, q k^T and p v (t*t*e each),
    and the LM head."""
    return layers * (t * 12 * e * e + 2 * t * t * e) + t * e * vocab


def write_nano(folder, model=MODEL, nano=NANO):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(textwrap.dedent(model))
    (folder / "nano.py").write_text(textwrap.dedent(nano))
    return folder / "nano.py"


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_error_line(res) -> str:
    assert res.exit_code != 0 and res.stdout == "", res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not _chatter(ln)]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def _chatter(line: str) -> bool:
    """The user's own prints (they go to stderr too)."""
    return line.startswith(("nano.py loaded", "number of parameters", "forward pass on", "hello"))


def test_nanogpt_style_module_profiles_to_json(tmp_path, monkeypatch):
    """The issue's case: nano.py imports its sibling model.py, both print, the model takes token ids;
    stdout is exactly one JSON document and the counts match a hand count."""
    write_nano(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")  # as a user would type it: a relative path
    res = run("profile", "nano.py:Small", "--input-dtype", "long", "--input-shape", "2,16", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # nothing but the document on stdout
    assert doc["kind"] == "module" and doc["model"] == "Small" and doc["input_shape"] == [2, 16]
    assert doc["params"]["total"] == gpt_params(2, 16) == 8656
    assert doc["forward"]["macs_per_sample"] == gpt_macs(2, 16, 16) == 139_520
    # The prints went to stderr: at import, in the constructor, and in every forward pass
    # (counting, measured memory and the timed latency runs).
    assert "nano.py loaded" in res.stderr and "number of parameters: 8656" in res.stderr
    assert res.stderr.count("forward pass on 16 tokens") > 5
    assert doc["latency"] and doc["memory"]["measured"]["inference_peak"] > 0


def test_sibling_modules_do_not_leak_between_files(tmp_path):
    """Two projects, each with its own model.py: each file gets its own sibling."""
    first = write_nano(tmp_path / "a")
    wide = MODEL.replace("n_embd: int = 16", "n_embd: int = 32").replace("vocab_size: int = 97", "vocab_size: int = 50")
    second = write_nano(tmp_path / "b", model=wide, nano=NANO.replace("n_embd: int = 16", "n_embd: int = 32"))
    a, _ = build_user_model(f"{first}:Small")
    b, _ = build_user_model(f"{second}:Small")
    assert sum(p.numel() for p in a.parameters()) == gpt_params(2, 16)
    assert sum(p.numel() for p in b.parameters()) == gpt_params(2, 32, vocab=50)
    import sys

    assert "model" not in sys.modules and str(tmp_path / "a") not in sys.path


def test_only_siblings_are_forgotten(tmp_path):
    """A sibling package is dropped after loading; a package installed inside the folder (a virtual
    environment's, here vendor/) stays imported, like anything imported before."""
    import sys

    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("WIDTH = 3\n")
    (tmp_path / "vendor" / "vendored_lib_x").mkdir(parents=True)
    (tmp_path / "vendor" / "vendored_lib_x" / "__init__.py").write_text("DEPTH = 2\n")
    (tmp_path / "net.py").write_text(textwrap.dedent('''
        import sys
        from pathlib import Path

        sys.path.append(str(Path(__file__).parent / "vendor"))
        import torch
        import vendored_lib_x
        from helpers import WIDTH

        def make():
            return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(vendored_lib_x.DEPTH)])
    '''))
    try:
        model, _ = build_user_model(f"{tmp_path / 'net.py'}:make")
        assert sum(p.numel() for p in model.parameters()) == 2 * (3 * 3 + 3)
        assert "helpers" not in sys.modules and "vendored_lib_x" in sys.modules
    finally:
        sys.modules.pop("vendored_lib_x", None)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(tmp_path / "vendor"))


def test_factory_and_typed_set_arguments(tmp_path):
    nano = write_nano(tmp_path)
    doc_res = run("profile", f"{nano}:tiny", "--set", "n_layer=3", "--set", "vocab=61", "--input-dtype", "long",
                  "--seq-len", "8", "--batch-size", "1", "--json", "--no-latency")
    assert doc_res.exit_code == 0, doc_res.output
    doc = json.loads(doc_res.stdout)
    assert doc["params"]["total"] == gpt_params(3, 16, vocab=61)
    assert doc["forward"]["macs_per_sample"] == gpt_macs(3, 16, 8, vocab=61)
    # Types come from the annotations, else from the default, else whatever the text reads as.
    source = tmp_path / "typed.py"
    source.write_text(textwrap.dedent('''
        from typing import Literal, Optional
        from torch import nn

        def make(width: int, rate: float = 0.1, bias: bool = True, sizes: tuple[int, ...] = (4,),
                 act: Literal["relu", "gelu"] = "relu", depth=2, label=None, extra: Optional[int] = None):
            return nn.Linear(width, width, bias=bias)
    '''))
    from dlkit.profiling.user_module import load_module_class

    make = load_module_class(f"{source}:make")
    got = constructor_kwargs(make, {"width": "8", "rate": "1e-2", "bias": "false", "sizes": "3,5", "act": "gelu",
                                    "depth": "3", "label": "x1", "extra": "none"}, "typed.py:make()")
    assert got == {"width": 8, "rate": 0.01, "bias": False, "sizes": (3, 5), "act": "gelu", "depth": 3,
                   "label": "x1", "extra": None}
    assert type(got["rate"]) is float and type(got["depth"]) is int
    with pytest.raises(UsageError, match="not one of relu, gelu"):
        constructor_kwargs(make, {"width": "8", "act": "tanh"}, "make()")
    with pytest.raises(UsageError, match="is not an int"):
        constructor_kwargs(make, {"width": "wide"}, "make()")
    with pytest.raises(UsageError, match=r"needs argument width \(\S*typed.py line 5\)"):
        constructor_kwargs(make, {}, "make()")


def test_token_ids_follow_the_first_embedding_or_vocab_size(tmp_path):
    nano = write_nano(tmp_path)
    from dlkit.profiling.target import resolve_target

    tgt, batch = resolve_target(f"{nano}:Small", input_shape="3,10", input_dtype="long")
    x = tgt.example(batch, "cpu")
    assert x.dtype == torch.int64 and x.shape == (3, 10) and int(x.max()) < 97 and int(x.min()) >= 0
    tgt, _ = resolve_target(f"{nano}:Small", input_shape="3,10", input_dtype="long", vocab_size=5)
    assert int(tgt.example(64, "cpu").max()) < 5
    line = one_error_line(run("profile", f"{nano}:Small", "--input-dtype", "long", "--input-shape", "1,8",
                              "--vocab-size", "500", "--no-latency"))
    assert "does not fit" in line and "model.py line" in line and "--vocab-size" in line


def test_forward_keeps_state_dict_and_copies_rebind(tmp_path):
    nano = write_nano(tmp_path)
    model, _ = build_user_model(f"{nano}:Small")
    plain_keys = set(type(model)(n_layer=2, n_embd=16).state_dict())
    assert set(model.state_dict()) == plain_keys and "forward" not in model.state_dict()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.ln_f.weight.zero_()  # the copy's own weights, not the original's, must answer
    x = torch.randint(0, 97, (1, 8))
    out, twin_out = model(x)[0], twin(x)[0]
    assert not torch.equal(out, twin_out) and torch.count_nonzero(twin_out) == 0


@pytest.mark.parametrize("case,files,args,expect", [
    ("sibling import", {"nano.py": "from model import GPTT\n"}, ["--input-shape", "1,4"],
     ["cannot load", "ImportError", "nano.py line 1", "python"]),
    ("syntax error in a sibling", {"nano.py": "from model import GPT\n", "model.py": "def f(:\n"},
     ["--input-shape", "1,4"], ["cannot load", "SyntaxError", "model.py line 1"]),
    ("constructor needs arguments", {}, ["--input-shape", "1,4", "NAME=GPT"],
     ["nano.py:GPT() needs argument config", "model.py line", "--set config=VALUE"]),
    ("a bug the arguments reach", {}, ["--input-dtype", "long", "--input-shape", "1,4", "--set", "n_embd=15"],
     ["nano.py:Small", "model.py line", "--debug"]),
    ("forward fails on the shape", {}, ["--input-dtype", "long", "--input-shape", "1,64"],
     ["input 1x64 (int64) does not fit nano.py:Small", "Cannot forward sequence of length 64",
      "model.py line", "(in forward)"]),
    ("floats into an embedding", {}, ["--input-shape", "1,8"], ["it takes token ids", "--input-dtype long"]),
    ("unknown argument", {}, ["--input-shape", "1,4", "--set", "layers=2"],
     ["takes no argument 'layers'", "nano.py line", "n_layer, n_embd"]),
    ("no such name", {}, ["--input-shape", "1,4", "NAME=Big"], ["has no class Big", "Small, tiny"]),
    ("dataset for a module", {}, ["--input-shape", "1,4", "--dataset", "mnist"], ["--dataset sizes registry"]),
])
def test_errors_in_the_users_file_are_one_line(tmp_path, case, files, args, expect):
    nano = write_nano(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    name = next((a.split("=")[1] for a in args if a.startswith("NAME=")), "Small")
    args = [a for a in args if not a.startswith("NAME=")]
    line = one_error_line(run("profile", f"{nano}:{name}", *args, "--no-latency"))
    for part in expect:
        assert part in line, (case, line)


def test_constructor_failing_names_its_line(tmp_path):
    text = NANO + "\n\ndef broken():\n    raise ValueError('no weights here')\n"
    nano = write_nano(tmp_path, nano=text)
    lineno = text.splitlines().index("    raise ValueError('no weights here')") + 1
    line = one_error_line(run("profile", f"{nano}:broken", "--input-shape", "1,4", "--no-latency"))
    assert "broken() failed: ValueError: no weights here" in line and f"nano.py line {lineno} (in broken)" in line


def test_debug_shows_the_users_traceback(tmp_path):
    nano = write_nano(tmp_path)
    res = run("profile", f"{nano}:Small", "--input-dtype", "long", "--input-shape", "1,64", "--no-latency", "--debug")
    assert res.exit_code != 0 and isinstance(res.exception, IncompatibleError)
    cause = res.exception.__cause__
    assert isinstance(cause, AssertionError)
    import traceback

    frames = traceback.extract_tb(cause.__traceback__)
    assert any(f.filename == str(tmp_path / "model.py") and f.name == "forward" for f in frames)


def test_compare_takes_modules_beside_each_other(tmp_path):
    nano = write_nano(tmp_path)
    res = run("compare", f"{nano}:Small", f"{nano}:tiny", "--input-dtype", "long", "--input-shape", "1,8",
              "--batch-size", "4", "--rounds", "1", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    small, tiny = doc["rows"]
    assert small["params"] == gpt_params(2, 16) and tiny["params"] == gpt_params(1, 16)
    assert small["macs"] == gpt_macs(2, 16, 8) and tiny["macs"] == gpt_macs(1, 16, 8)
    assert small["accuracy"] is None and small["step"] == "module" and small["ratios"]["accuracy"] is None
    assert abs(tiny["ratios"]["params"] - gpt_params(1, 16) / gpt_params(2, 16)) < 1e-9
    assert set(small["latency_ms"]) == {"1", "4"} and "forward pass on 8 tokens" in res.stderr
    csv = run("compare", f"{nano}:Small", "--input-dtype", "long", "--input-shape", "1,8", "--batch-size", "2",
              "--rounds", "1", "--csv", "--quiet")
    assert csv.exit_code == 0 and csv.stdout.splitlines()[1].startswith(f"{nano}:Small,Small,module,,,")
    line = one_error_line(run("compare", f"{nano}:Small", "--input-dtype", "long", "--input-shape", "1,8",
                              "--fail-under", "accuracy=0.5", "--quiet"))
    assert "--fail-under checks test metrics" in line
    line = one_error_line(run("compare", f"{nano}:Small", "--plot", tmp_path / "p.png"))
    assert "--plot" in line and not (tmp_path / "p.png").exists()


def test_train_refuses_a_users_module(tmp_path):
    nano = write_nano(tmp_path)
    res = run("train", f"{nano}:Small", "--dataset", "digits")
    line = one_error_line(res)
    assert res.exit_code == 2 and "your own module" in line and "without running code" in line
    assert not (tmp_path / "runs").exists() and "nano.py loaded" not in res.stderr  # nothing of it ran


def test_size_of_a_tied_model_is_the_file_save_model_writes(tmp_path):
    """compare's size: the tied LM head is stored once, as an artifact stores it."""
    from safetensors.torch import save_model

    from dlkit.profiling.measure import weights_bytes

    nano = write_nano(tmp_path)
    model, _ = build_user_model(f"{nano}:Small")
    save_model(model, str(tmp_path / "w.safetensors"))
    assert weights_bytes(model) == (tmp_path / "w.safetensors").stat().st_size
    assert weights_bytes(model) < 4 * (gpt_params(2, 16) + 97 * 16)  # the shared matrix is not stored twice
