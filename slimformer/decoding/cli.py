"""``slimformer generate``: a thin adapter over :func:`generate` / :func:`speculative_generate`."""
from __future__ import annotations

import click


def register(group: click.Group) -> None:
    group.add_command(generate_cmd)


@click.command("generate")
@click.option("--model", "-m", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True,
              help="Prompt text (repeat for a batch).")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--draft", help="Speculative decoding with this draft model (same vocabulary), e.g. the "
              "same model compressed (a W8A8 or W4 folder).")
@click.option("--draft-int8-head", is_flag=True,
              help="The --draft model proposes with a W8A8 copy of its LM head (faster; output unchanged).")
@click.option("--prompt-lookup", is_flag=True, help="Speculative decoding with n-gram prompt lookup.")
@click.option("--self-draft-layers", type=int, help="Speculative decoding with the first k blocks as draft.")
@click.option("--num-draft", "-k", default=4, show_default=True, type=int, help="Draft length k.")
@click.option("--adaptive/--fixed", default=True, show_default=True,
              help="Adapt k to the running acceptance rate.")
@click.option("--max-draft", type=int, default=None,
              help="Longest adaptive draft (default 2 x k). 7 makes a verify 8 tokens, one pass of our "
                   "few-token kernels.")
@click.option("--threads", default=0, type=int, help="torch threads (0 = default).")
@click.option("--compile", "compile_", is_flag=True,
              help="Decode steps through torch.compile: the plain loop's, or the --draft model's "
                   "(the first step compiles, ~1 min).")
def generate_cmd(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, draft, draft_int8_head,
                 prompt_lookup, self_draft_layers, num_draft, adaptive, max_draft, threads, compile_):
    """Generate text with our static-cache loop (optionally speculative); prints text and tokens/s."""
    import torch

    from slimformer.decoding import SamplingConfig, generate
    from slimformer.decoding.speculative import (PromptLookupDraft, early_exit_draft, model_draft,
                                                 speculative_generate)
    from slimformer.errors import SlimformerError
    from slimformer.models import load

    chosen = [x for x in (draft, prompt_lookup or None, self_draft_layers) if x is not None]
    if len(chosen) > 1:
        raise SlimformerError("choose one of --draft, --prompt-lookup, --self-draft-layers")
    if threads:
        torch.set_num_threads(threads)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    lm = load(model)
    if draft:
        d = model_draft(lm, load(draft), compile=compile_, int8_head=draft_int8_head)
    elif prompt_lookup:
        d = PromptLookupDraft()
    elif self_draft_layers is not None:
        d = early_exit_draft(lm, self_draft_layers)
    else:
        d = None
    if draft_int8_head and not draft:
        raise SlimformerError("--draft-int8-head needs --draft")
    if max_draft is not None and d is None:
        raise SlimformerError("--max-draft needs a draft (--draft, --prompt-lookup or --self-draft-layers)")
    if compile_ and d is not None and not draft:
        raise SlimformerError("--compile applies to the plain loop and to --draft models; drop it for "
                              "--prompt-lookup / --self-draft-layers")
    if d is None:
        res = generate(lm, list(prompts), max_new_tokens, sampling=sampling, seed=seed, compile=compile_)
    else:
        res = speculative_generate(lm, list(prompts), max_new_tokens, draft=d, num_draft=num_draft,
                                   adaptive=adaptive, max_draft=max_draft, sampling=sampling, seed=seed)
    for p, text in zip(prompts, res.texts):
        click.echo(p + text)
        click.echo("")
    line = f"{res.num_new_tokens} tokens in {res.seconds:.2f} s: {res.tokens_per_s:.1f} tokens/s"
    if res.stats:
        line += (f" (acceptance {res.stats['acceptance']:.2f}, "
                 f"{res.stats['tokens_per_step']:.2f} tokens per target forward)")
    click.echo(line, err=True)
