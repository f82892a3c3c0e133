"""dlkit generate ARTIFACT [--prompt TEXT | --prompt-file F | -]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dlkit.cli.common import DebugOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, emit_json, err, handle_errors


@handle_errors
def generate(
    artifact: Annotated[str, typer.Argument(help="A language-model artifact folder (trained on text-lm data; "
                                                 "float, pruned or int8), or an hf: causal LM (hf:DIR, hf:ORG/NAME).")],
    prompt_from: Annotated[Optional[str], typer.Argument(metavar="[-]", help="- reads the prompt from stdin.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The text to continue [default: a newline].")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Read the prompt from this UTF-8 file.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per sample.")] = 256,
    temperature: Annotated[float, typer.Option(help="Divides the logits; 0 picks the most likely token.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens only.")] = None,
    top_p: Annotated[float, typer.Option(help="Sample among the most likely tokens whose probability "
                                              "reaches p (nucleus sampling).")] = 1.0,
    num_samples: Annotated[int, typer.Option(help="Independent continuations, one after another.")] = 1,
    kv_cache: Annotated[bool, typer.Option("--kv-cache/--no-kv-cache", help="Keep the keys and values of past "
                                           "positions, so each new token costs one position.")] = True,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Generate text from a language model: the prompt and its continuation stream to stdout as
    they are produced (samples separated by a blank line); prefill and decode tokens/s on stderr.

    With --json, nothing streams: one JSON document with the samples and token counts.
    """
    from dlkit.artifacts import resolve_path
    from dlkit.lm.generate import write_stdout
    from dlkit.steps import STEPS, StepHooks

    step = STEPS["generate"]
    source, opts = step.build(artifact if artifact.startswith("hf:") else resolve_path(artifact), prompt_from=prompt_from, prompt=prompt, prompt_file=prompt_file,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              num_samples=num_samples, kv_cache=kv_cache, device=device, seed=seed)
    res = step.run(source, opts, StepHooks(observer=None if json else write_stdout))
    if not quiet:
        _report(res)
    if json:
        emit_json(res.to_dict())


def _report(res) -> None:
    def rate(v):
        return f"{v:,.0f} tokens/s" if v else "n/a"

    err.print(f"[bold]{res.model}[/]: {len(res.samples)} sample(s), {res.prompt_tokens} prompt tokens, "
              f"{sum(s['new_tokens'] for s in res.samples)} new; prefill {rate(res.prefill_tokens_per_s)}, "
              f"decode {rate(res.decode_tokens_per_s)} ({'KV cache' if res.kv_cache else 'no cache'}, {res.device})",
              highlight=False)
