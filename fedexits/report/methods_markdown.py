"""The report's Methods section (markdown): the methods compared on the same users, the pruning
levels, the fail-safe note and the rule for "exits win at equal cost". Kept apart from
`report.markdown` (the run report's frame), which calls `methods_section` in one line."""

from __future__ import annotations

from collections.abc import Mapping

from fedexits.report.markdown import count, markdown_table, number, percent, points, times_x
from fedexits.report.methods import FULL_NETWORK

PER_EXIT_METHODS_NOTE = (
    " Other methods: `final` and `full` fine-tune the final classifier (and `full` the backbone), "
    "so their final exit changes; the pruning methods do not use the exits (their early exits "
    "have no *after*) and their final row is the user's pruned and retrained network, with its "
    "own MFLOPs, parameters and latency."
)


def methods_section(comparison: Mapping) -> list[str]:
    """The Methods section: one table (and one figure) comparing the methods on the same users,
    the pruning levels, and the rule for "exits win at equal cost"."""
    table, levels = comparison["table"], comparison["levels"]
    pruning = list(levels["method"].unique()) if len(levels) else []
    table = table.assign(
        fail_safe=table["fail_safe"].map({True: "yes", False: "no"}),
        method=table["method"].map(lambda m: m if m != FULL_NETWORK else "full network (shared model)"),
    )
    lines = [
        "## Methods",
        "",
        (
            f"Every method on the same {comparison['users']} users (init `{comparison['init']}`), each at "
            "its operating point: the calibrated threshold for the exit-based methods (`exits` trains "
            "only the exits; `final`, `full` fine-tune the final classifier / the whole network; "
            "`none` keeps the shared model), the user's pruned and retrained network for the pruning "
            "methods. Speedups are against the full network; MFLOPs and latency are per sample "
            "(latency at batch 1, in the run's runtime)."
        ),
        "",
        markdown_table(table, METHODS_COLUMNS, METHODS_FORMATS),
        "",
    ]
    if pruning:
        lines += [
            (
                "**Pruning gives up the fail-safe.** `prune_data` (channel importance measured on the "
                "user's data) and `prune_agnostic` (filter L1 norm of the shared weights) remove "
                "channels of the backbone and of the shared final classifier, then retrain the "
                "smaller network on the user's data: the user runs that network alone, so no shared "
                "final classifier is left to fall back on. The exits are not used by the pruning "
                "methods. A pruned network's MFLOPs are measured on it (torch's flop counter); its "
                "latency is measured in the run's runtime round-robin with the unpruned network, "
                "and that ratio scales the run's latency profile of the full network. Training time "
                "and peak memory are those of pruning and retraining at the user's level."
            ),
            "",
            "*Exits win*: " + comparison["rule"],
            "",
            "Every pruning level (the users' accuracy/cost curves, prune_sweep.csv):",
            "",
            markdown_table(levels, LEVEL_COLUMNS, LEVEL_FORMATS),
            "",
        ]
    if comparison.get("figure"):
        caption = "Methods: mean accuracy vs MFLOPs and latency per sample"
        lines += [f"![{caption}]({comparison['figure']})", ""]
    return lines


METHODS_COLUMNS = {
    "method": "method", "users": "users", "accuracy_mean": "accuracy", "mflops_mean": "MFLOPs/sample",
    "latency_ms_mean": "ms/sample", "speedup_mean": "speedup (FLOPs)",
    "latency_speedup_mean": "speedup (latency)", "personalise_s_mean": "training (s/user)",
    "peak_memory_mb_mean": "peak memory (MB)", "fail_safe": "fail-safe kept",
    "exits_win_share_mflops": "exits win at equal FLOPs", "exits_minus_pp_mflops":
    "exits - method at equal FLOPs (pp)", "out_of_range_mflops": "out of range",
    "exits_win_share_latency": "exits win at equal latency",
}  # fmt: skip
METHODS_FORMATS = {
    "users": count, "accuracy_mean": percent, "mflops_mean": number, "latency_ms_mean": number,
    "speedup_mean": times_x, "latency_speedup_mean": times_x, "personalise_s_mean": number,
    "peak_memory_mb_mean": lambda v: number(v, 1), "exits_win_share_mflops": percent,
    "exits_minus_pp_mflops": points, "out_of_range_mflops": count, "exits_win_share_latency": percent,
}  # fmt: skip
LEVEL_COLUMNS = {
    "method": "method", "level": "FLOPs removed (asked)", "users": "users", "accuracy_mean": "accuracy",
    "mflops_mean": "MFLOPs", "latency_ms_mean": "ms/sample", "speedup_mean": "speedup (FLOPs)",
    "personalise_s_mean": "training (s/user)", "exits_at_mflops_mean": "exits at equal FLOPs",
    "exits_win_share_mflops": "exits win", "gain_over_agnostic_pp_mean": "data-aware - agnostic (pp, mean)",
    "gain_over_agnostic_pp_median": "(median)", "share_data_aware_better": "data-aware better",
}  # fmt: skip
LEVEL_FORMATS = {
    "level": percent, "users": count, "accuracy_mean": percent, "mflops_mean": number,
    "latency_ms_mean": number, "speedup_mean": times_x, "personalise_s_mean": number,
    "exits_at_mflops_mean": percent, "exits_win_share_mflops": percent,
    "gain_over_agnostic_pp_mean": points, "gain_over_agnostic_pp_median": points,
    "share_data_aware_better": percent,
}  # fmt: skip
