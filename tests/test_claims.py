"""The demo's claims on hand-made evaluation rows, over seeds, and the report / README splice."""

import json

import pytest

from lit_bluelm import claims, needle, report
from lit_bluelm.claims import Evidence, judge, mean_rows, over_seeds
from lit_bluelm.evaluation import Row
from lit_bluelm.needle import PasskeyRow
from lit_bluelm.summary import write_json


def row(task, mode, budget, acc, stderr=0.02, opened=None, within=1.0):
    opened = (1.0 if mode == "think" else 0.0) if opened is None else opened
    return Row(task, mode, budget, acc, stderr, 300, 10.0, opened, within)


def rows(arith=(0.0, 0.01, 0.2, 0.6), plain=0.05, color=(0.95, 0.93), count=(0.72, 0.75)):
    out = [row("demo_arith", "think", b, a) for b, a in zip((0, 8, 32, 128), arith, strict=True)]
    out.append(row("demo_arith", "no_think", None, plain))
    for task, (think, no_think) in (("demo_color", color), ("demo_count", count)):
        out += [row(task, "think", 128, think), row(task, "no_think", None, no_think)]
    return out


SUMMARIES = {
    "text": {"val_loss_after": 0.97},
    "text_scratch": {"val_loss_after": 1.09},
    "reasoning": {"val_loss_after_by_source": {"cot": 0.40, "text": 1.0, "passkey": 0.9}},
    "long_context_short": {"val_loss_after_by_source": {"cot": 0.41, "text": 1.02, "passkey": 0.9}},
    "reward": {
        "val_accuracy_after": 0.93,
        "val_accuracy_after_by_source": {"pref_think": 0.85, "pref_topic": 1.0, "pref_color": 0.94},
        "val_pairs_after": 320.0,
    },
    "rl": {
        "reward_first_by_task": {"demo_arith": 0.5, "demo_count": 0.6, "demo_open": 0.1},
        "reward_last_by_task": {"demo_arith": 0.7, "demo_count": 0.65, "demo_open": 0.3},
    },
}


def rl_evals(sampled=(0.6, 0.7), greedy=None):
    """The RL evaluations: greedy rows (the SFT ones unless given) and the sampled arith rows."""
    arith = lambda acc: [row("demo_arith", "think", 128, acc)]  # noqa: E731
    return {
        "eval_rl": rows() if greedy is None else greedy,
        "eval_sft_sampled": arith(sampled[0]),
        "eval_rl_sampled": arith(sampled[1]),
    }


def passkey(at_1x=(0.9, 0.9), at_4x=(0.0, 0.3)):
    """Before / after rows at 1x and 4x (two depths each: the mean is what is judged)."""
    out = {}
    for i, when in enumerate(("before", "after")):
        out[when] = [
            PasskeyRow("passkey", n, f, d, acc + (0.05 if d else -0.05), 20)
            for n, f, acc in ((512, 1.0, at_1x[i]), (2048, 4.0, at_4x[i]))
            for d in (0.0, 1.0)
        ]
    return out


def by_name(found):
    return {c.name: c for c in found}


def test_every_claim_on_a_run_that_meets_them():
    ev = Evidence(SUMMARIES, rows(), passkey(), rl_evals())
    found = by_name(judge(ev))
    assert len(found) == len(claims.CLAIMS) and all(c.met for c in found.values())
    assert [c.name for c in judge(ev, claims.RL_CLAIMS)] == list(found)[-len(claims.RL_CLAIMS) :]
    assert found["passkey at 4x context: after - before"].value == pytest.approx(0.3)
    assert found["passkey at 1x context: after - before"].value == pytest.approx(0.0)
    assert found["long_context: reasoning val/loss by source, after / before"].value == pytest.approx(1.025)
    assert found["demo_arith: think@128 - no_think"].value == pytest.approx(0.55)
    assert found["demo_color: think@128 - no_think"].value == pytest.approx(0.02)
    assert found["demo_count: no_think accuracy"].value == pytest.approx(0.75)
    assert found["text: distilled val/loss < scratch's"].target == "< 1.0900"
    assert found["reward: held-out pair accuracy"].value == pytest.approx(0.93)
    assert found["reward: worst pair type's accuracy"].value == pytest.approx(0.85)
    assert found["reward: held-out pairs measured"].value == 320
    # 0.1 over the SFT checkpoint, less max(0.03, 2 hypot(0.02, 0.02))
    gain = found["rl: demo_arith think sampled pass@1 gain - max(0.03, 2 stderr)"]
    assert gain.value == pytest.approx(0.1 - 2 * 0.02 * 2**0.5)
    keep = found["rl: greedy think@128 - SFT's + 1 stderr, worst task"]
    assert keep.value == pytest.approx(0.02 * 2**0.5)  # the same rows: 0 + 1 stderr
    assert found["rl: each route's reward, last tenth of steps - first"].value == pytest.approx(0.05)
    # the smallest rise is 0 -> 8: 0.01 + hypot(0.02, 0.02)
    monotone = found["demo_arith: accuracy rises with budget 0/8/32/128 (1 stderr)"]
    assert monotone.value == pytest.approx(0.01 + 0.02 * 2**0.5)


def test_each_claim_is_missed_on_its_own_failure():
    def missed(ev):
        found = judge(ev)
        return {c.name for c in found if not c.met}

    assert missed(Evidence(rows=rows(arith=(0.0, 0.01, 0.2, 0.44)))) == {"demo_arith: think@128 - no_think"}
    assert missed(Evidence(rows=rows(arith=(0.0, 0.2, 0.1, 0.6)))) == {
        "demo_arith: accuracy rises with budget 0/8/32/128 (1 stderr)"
    }
    assert missed(Evidence(rows=rows(color=(0.95, 0.89)))) == {"demo_color: no_think accuracy"}
    # thinking may trail no-think by 0.05 at most
    assert missed(Evidence(rows=rows(count=(0.70, 0.75)))) == set()
    assert missed(Evidence(rows=rows(count=(0.69, 0.75)))) == {"demo_count: think@128 - no_think"}
    bad_format = rows()
    bad_format[0] = row("demo_arith", "think", 0, 0.0, opened=0.9)
    bad_format[4] = row("demo_arith", "no_think", None, 0.05, within=0.99)
    assert missed(Evidence(rows=bad_format)) == {"thinking format: rows off target (open rate, budget)"}
    assert len(claims.format_failures(bad_format)) == 2
    worse = {"text": {"val_loss_after": 1.2}, "text_scratch": {"val_loss_after": 1.09}}
    assert missed(Evidence(worse, rows())) == {"text: distilled val/loss < scratch's"}
    assert missed(Evidence(rows=rows(), passkey=passkey(at_4x=(0.0, 0.15)))) == {
        "passkey at 4x context: after - before"
    }
    assert missed(Evidence(rows=rows(), passkey=passkey(at_1x=(0.9, 0.8)))) == {
        "passkey at 1x context: after - before"
    }
    assert missed(Evidence(rows=rows(), passkey=passkey(at_1x=(0.9, 0.85)))) == set()  # -0.05 holds
    forgot = {**SUMMARIES, "long_context_short": {"val_loss_after_by_source": {"cot": 0.43, "text": 1.0}}}
    assert missed(Evidence(forgot)) == {"long_context: reasoning val/loss by source, after / before"}
    reward = SUMMARIES["reward"]
    weak = {"reward": {**reward, "val_accuracy_after": 0.89}}
    assert missed(Evidence(weak)) == {"reward: held-out pair accuracy"}
    one_type = {"reward": {**reward, "val_accuracy_after_by_source": {"pref_think": 0.79, "pref_topic": 1.0}}}
    assert missed(Evidence(one_type)) == {"reward: worst pair type's accuracy"}
    few = {"reward": {**reward, "val_pairs_after": 299.0}}
    assert missed(Evidence(few)) == {"reward: held-out pairs measured"}
    small_gain = rl_evals(sampled=(0.6, 0.65))  # 0.05 < 2 stderr of the difference (0.057)
    assert missed(Evidence(rows=rows(), evals=small_gain)) == {
        "rl: demo_arith think sampled pass@1 gain - max(0.03, 2 stderr)"
    }
    worse = rows()
    worse[3] = row("demo_arith", "think", 128, 0.54)  # 0.06 below SFT's, 1 stderr is 0.028
    assert missed(Evidence(rows=rows(), evals=rl_evals(greedy=worse))) == {
        "rl: greedy think@128 - SFT's + 1 stderr, worst task"
    }
    flat = {"rl": {**SUMMARIES["rl"], "reward_last_by_task": {"demo_arith": 0.7, "demo_open": 0.1}}}
    assert missed(Evidence(flat)) == {"rl: each route's reward, last tenth of steps - first"}


def test_claims_without_evidence_are_left_out():
    assert judge(Evidence()) == []
    only_text = judge(Evidence({k: SUMMARIES[k] for k in ("text", "text_scratch")}))
    assert [c.name for c in only_text] == ["text: distilled val/loss < scratch's"]


def test_over_seeds_every_seed_or_the_mean():
    # seed 2 misses the gain; seed 1 dips at budget 8, but the mean rises
    seed1 = Evidence(rows=rows(arith=(0.0, 0.0, 0.3, 0.7), plain=0.0))
    seed2 = Evidence(rows=rows(arith=(0.0, 0.1, 0.2, 0.4), plain=0.05))
    seed1.rows[1] = row("demo_arith", "think", 8, 0.0, stderr=0.0)
    seed1.rows[0] = row("demo_arith", "think", 0, 0.1, stderr=0.0)
    found = {c.name: c for c in over_seeds([seed1, seed2])}
    gain = found["demo_arith: think@128 - no_think"]
    assert (gain.mean, gain.min, gain.met) == (pytest.approx(0.525), pytest.approx(0.35), False)
    monotone = found["demo_arith: accuracy rises with budget 0/8/32/128 (1 stderr)"]
    assert monotone.judged_on == "mean" and monotone.met  # seed 1 alone would miss it
    assert not claims.budget_monotone(seed1).met
    assert found["demo_color: no_think accuracy"].met
    block = claims.seeds_block(list(found.values()), [1235, 1236])
    assert "claims over seeds 1235, 1236" in block and "missed" in block and "(on the mean)" in block


def test_mean_rows_average_accuracy_and_combine_stderr():
    a = [row("demo_arith", "no_think", None, 0.2, stderr=0.03)]
    b = [row("demo_arith", "no_think", None, 0.4, stderr=0.04)]
    [m] = mean_rows([a, b])
    assert (m.accuracy, m.stderr, m.n) == (pytest.approx(0.3), pytest.approx(0.025), 600)


def test_the_claims_block_prints_one_line_a_claim():
    found = judge(Evidence(SUMMARIES, rows()))
    lines = claims.claims_block(found).splitlines()
    assert lines[0].split() == ["claim", "target", "measured", "result"]
    assert len(lines) == len(found) + 1 and all(line.endswith(" met") for line in lines[1:])


def test_the_report_renders_from_its_files_and_goes_into_the_readme(tmp_path):
    runs = tmp_path / "demo"
    for name, s in {"text": 0.97, "text_scratch": 1.09}.items():
        (runs / name).mkdir(parents=True)
        summary = {"stage": "text", "module": "distill", "global_step": 5, "val_loss_after": s}
        (runs / name / "summary.json").write_text(json.dumps(summary))
    (runs / "eval_sft").mkdir()
    (runs / "eval_sft" / "results.json").write_text(json.dumps({"results": [r.__dict__ for r in rows()]}))
    keys = passkey()
    for when, passkey_rows in keys.items():
        (runs / f"passkey_{when}").mkdir()
        (runs / f"passkey_{when}" / "results.json").write_text(
            json.dumps({"results": [r.__dict__ for r in passkey_rows]})
        )
    found = judge(Evidence(SUMMARIES, rows(), keys))
    record = {
        "commit": "abc123",
        "date": "2026-12-04 12:00 UTC",
        "machine": {
            "cpu_cores": 2,
            "torch_threads": 2,
            "platform": "Linux",
            "python": "3.11",
            "torch": "2.14",
        },
        "runs": [str(runs / "text"), str(runs / "text_scratch")],
        "eval": str(runs / "eval_sft"),
        "passkey": {f"passkey_{when}": str(runs / f"passkey_{when}") for when in keys},
        "seconds": {"text": 20.0, "eval_sft": 10.0},
        "claims": [c.__dict__ for c in found],
    }
    write_json(runs / report.REPORT_JSON, record)
    md = report.write_report(runs).read_text()
    assert "commit `abc123`" in md and "2 CPU cores" in md and "Time: 30 s" in md
    assert claims.claims_block(found) in md and "demo_color     no_think" in md
    assert "Passkey retrieval, before the context switch" in md and "20 trials a cell" in md
    assert needle.table(keys["after"]) in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN} (generated) -->\nold figures\n{report.END}\nrest\n")
    assert report.main(["--runs", str(runs), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text and md.strip() in text
    assert text.startswith("intro\n<!-- BEGIN demo-report") and text.endswith(f"{report.END}\nrest\n")
    assert report.splice(text, md) == text  # regenerating an unchanged report changes nothing
    # the seeds' figures, and what a --seeds --from run reran
    seeds = {"commit": "abc123", "date": "d", "seeds": [1235], "seconds": 5.0, "folders": [], "from": None}
    seeds |= {"claims": [c.__dict__ for c in over_seeds([Evidence(rows=rows())])], "per_seed": [[]]}
    write_json(runs / report.SEEDS_JSON, seeds)
    assert "the stages after the text stage again with seeds 1235" in report.render(runs)
    write_json(runs / report.SEEDS_JSON, {**seeds, "from": "reward"})
    assert "each seed's runs again from `reward` on with seeds 1235" in report.render(runs)


def test_the_report_and_the_splice_refuse_what_is_missing(tmp_path, capsys):
    assert report.main(["--runs", str(tmp_path)]) == 2
    assert "report.json not found: run `make demo` first" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no '<!-- BEGIN demo-report"):
        report.splice("no markers here", "x")


def test_a_dip_of_exactly_one_stderr_is_within_it():
    # 1/300 at budget 0, 0/300 at budget 8, stderr 1/300: the difference plus its stderr is 0
    # in exact arithmetic and about -4e-19 in floats (seen on a seed run); it holds
    k = 1 / 300
    rows = [row("demo_arith", "think", 0, k, k), row("demo_arith", "think", 8, 0.0, 0.0)]
    rows += [row("demo_arith", "think", b, 0.9, 0.02) for b in (32, 128)]
    monotone = claims.budget_monotone(Evidence(rows=rows))
    assert abs(monotone.value) < 1e-12 and monotone.met
