"""report.md from the sections of `taer bench all`: header, every target, each section, notes."""

from __future__ import annotations

from collections.abc import Sequence


def render_report(machine: dict, seconds: float, inputs, sizes, sections: Sequence) -> str:
    lines = ["# taer benchmark report", "", *_header(machine, seconds, inputs), "", "## Targets", ""]
    lines += _targets_table(sections)
    failed = [s for s in sections if s.error]
    if failed:
        lines += ["", "Sections that did not complete (their results are missing from this report):", ""]
        lines += [f"- {s.title}: {s.error}" for s in failed]
    for section in sections:
        lines += ["", f"## {section.title}", ""]
        if section.error:
            lines += [f"**Not completed**: {section.error}", ""]
        if section.markdown:
            lines += [_demote_headings(section.markdown.strip()), ""]
        lines += [f"![{section.title}]({name})" for name in section.figures]
        lines += ["", f"_Section time: {section.seconds:.0f} s._"]
    lines += ["", "## Notes", "", *_notes(sizes)]
    return "\n".join(lines) + "\n"


def _header(machine: dict, seconds: float, inputs) -> list[str]:
    gpu = machine.get("gpu") or "none"
    lines = [
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; GPU: {gpu}; "
        f"torch {machine['torch']}.",
        f"- Date: {machine['date']} (UTC). Whole run: {seconds / 60:.1f} min. Load average when it began "
        f"(1/5/15 min): {' / '.join(str(x) for x in machine.get('load_average', [])) or 'unknown'}.",
        "- Absolute times are this machine's and only indicative"
        + (" (no GPU here); the ratios side by side are the result." if gpu == "none" else "."),
    ]
    try:
        from expert_store.manifest import Manifest

        manifest = Manifest.load(inputs.store)
        layout = manifest.layout
        expert_kb = layout.params_per_expert * _dtype_bytes(manifest.dtype) / 1e3
        lines.append(
            f"- Model: {manifest.family}, {len(layout.moe_layers)} MoE layers x {layout.num_experts} experts "
            f"(top-{layout.top_k}), {expert_kb:.0f} KB per expert ({manifest.dtype}); store `{inputs.store}`, "
            f"checkpoint `{inputs.checkpoint}`, tasks `{inputs.tasks}`."
        )
    except Exception as error:  # the header must not fail the report
        lines.append(f"- Model: store `{inputs.store}` ({type(error).__name__} reading its manifest)")
    return lines


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(name).replace("torch.", ""), 4)


def _targets_table(sections: Sequence) -> list[str]:
    rows, counts = [], {"met": 0, "missed": 0, "not measured": 0}
    for section in sections:
        for target in section.targets:
            name = target.get("target") or target.get("name", "?")
            measured = target.get("measured")
            shown = (
                "not measured"
                if measured is None
                else f"{measured:.3g}"
                if isinstance(measured, float)
                else str(measured)
            )
            met = target.get("met")
            verdict = "met" if met else "not measured" if met is None else "missed"
            counts[verdict] += 1
            rows.append(f"| {section.key} | {name} | {shown} | {_VERDICTS[verdict]} |")
    if not rows:
        return ["No targets were measured."]
    return [
        f"{counts['met']} of {len(rows)} targets met; {counts['missed']} missed (marked **MISSED**); "
        f"{counts['not measured']} not measured.",
        "",
        "| section | target | measured | met |",
        "|---|---|---|---|",
        *rows,
    ]


_VERDICTS = {"met": "yes", "missed": "**MISSED**", "not measured": "not measured"}


def _demote_headings(markdown: str) -> str:
    """Sections sit under a level-2 heading: their own headings move down to level 3 and below."""
    lines = markdown.splitlines()
    levels = [len(line) - len(line.lstrip("#")) for line in lines if line.startswith("#")]
    shift = max(0, 3 - min(levels)) if levels else 0
    return "\n".join("#" * shift + line if line.startswith("#") else line for line in lines)


def _notes(sizes) -> list[str]:
    serving = sizes.serving
    return [
        f"- Policies: {sizes.per_task} eval prompts per task, tasks interleaved; batch 1; at most "
        f"{sizes.max_new_tokens} new tokens (greedy, stops at the end token); {sizes.threads} torch thread(s). "
        "Each policy runs on a fresh runtime whose experts were all read once (page cache warm). TTFT includes "
        "retrieval and activation for (a) and (b). Loads count every expert copied into a slot (prefetch and on "
        "demand); misses count only on-demand loads of experts the router chose.",
        f"- Server: {', '.join(str(c) for c in serving.clients)} clients, {serving.max_tokens} tokens per request, "
        f"each level bounded to {serving.time_cap_s:.0f} s; every server on 127.0.0.1 only, all up together and measured in turn at each level (idle servers use no CPU). taer is "
        "asked through /v1/chat/completions; transformers serve through /v1/completions with the same prompt "
        "rendered by the same chat template, because its chat endpoint applies a ChatML reply parser to Qwen3-MoE "
        "models and streams the prompt back for a checkpoint with another chat format. Exactly the same number of "
        "tokens is generated on both (taer `ignore_eos`, transformers `eos_token_id: -1`).",
        "- The peer comes from `transformers[serving]` (install with `pip install -e '.[serving-peer]'`; it adds "
        "`accelerate`, which `transformers serve` needs even on the CPU). Its continuous-batching mode is given a "
        "KV cache of 256 blocks x 32 tokens; left to its default it reserves a large share of host RAM on a CPU.",
        "- Memory: one fresh process per configuration, RSS after loading and one forward pass.",
        "- Reproduce: `make bench`, or `taer bench all --out DIR`; `taer bench serving` runs parts 1 and 2 alone.",
    ]
