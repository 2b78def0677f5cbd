"""The report's figures: whole-number iterations, a title naming the run, panel titles with
units, no legend entry for an arm that did not run, plain tick labels; the per-step training
curves; metrics.jsonl read as a resumed run leaves it."""
import json

import pytest

import report
from errors import InputError

import matplotlib  # noqa: F401 (report.py plots with it)


def evals(baseline):
    rows = [{"type": "eval", "arm": "start", "iteration": 0, "exact_match": 0.864, "gt_logp_per_token": -1.0002,
             "opponent_equals_gt": 0.264, "reward_accuracy": None, "reward_margin": None}]
    for t in (1, 2, 3):
        rows.append({"type": "eval", "arm": "spin", "iteration": t, "exact_match": 0.864 + t / 100,
                     "gt_logp_per_token": -1.0002 - t * 1e-4, "opponent_equals_gt": 0.3, "reward_accuracy": 0.6,
                     "reward_margin": 0.5})
        if baseline:
            rows.append(dict(rows[-1], arm="sft", exact_match=0.88 + t / 100))
    return rows


def steps(stage, n, **extra):
    return [{"type": "step", "stage": stage, "step": s, "steps": n, "loss": 1.0 / s, "lr": 1e-4, **extra} for s in
            range(1, n + 1)]


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]


@pytest.mark.parametrize("baseline", [False, True])
def test_eval_figure(baseline):
    fig = report.eval_figure(evals(baseline), "spin-20250101")
    assert fig._suptitle.get_text() == "spin-20250101: held-out metrics per iteration"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "Held-out exact match (%)" and "nats per token" in titles[1]
    assert not any(x in " ".join(titles) for x in ("GT logp/tok", "samples=GT"))
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == (["SPIN", "continued SFT (baseline)"] if baseline else ["SPIN"])
    fig.canvas.draw()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
        assert ax.yaxis.get_offset_text().get_text() == ""  # matplotlib would write "-1" in the corner
    # a value, not a fraction, on percentage panels: 86.4% at the start
    assert fig.axes[0].lines[0].get_ydata()[0] == pytest.approx(86.4)


def test_eval_figure_whole_iterations_with_one_point():
    rows = [r for r in evals(False) if r["iteration"] <= 1]
    fig = report.eval_figure(rows, "r")
    fig.canvas.draw()
    for ax in fig.axes:  # reward panels hold only iteration 1; their axis is still 0, 1
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]


def test_training_figure_per_stage_and_last_record_wins():
    spin = dict(zip(("rewards/accuracies", "rewards/margins"), (0.5, 0.1)))
    recs = steps("sft", 6) + steps("spin0", 5, **spin) + steps("spin1", 5, **spin) + steps("sft0", 5)
    recs.append(dict(recs[-1], loss=9.0))  # a resumed run repeats a step: its last record wins
    fig = report.training_figure(recs, "run")
    assert fig._suptitle.get_text() == "run: training curves, per step"
    assert [ax.get_title() for ax in fig.axes] == [
        "SPIN loss (nats per pair)", "SPIN reward accuracy on\ntraining batches (%)",
        "SPIN reward margin on\ntraining batches (beta x nats)", "SFT loss (nats per token)"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["SPIN, iteration 1", "SPIN, iteration 2"]
    sft = {l.get_label(): l for l in fig.axes[3].lines}
    assert set(sft) == {"SFT warm start", "baseline, iteration 1"}
    assert list(sft["baseline, iteration 1"].get_ydata()) == [1.0, 0.5, 1 / 3, 0.25, 9.0]
    assert fig.axes[1].lines[0].get_ydata()[0] == pytest.approx(50.0)
    assert report.training_figure([{"type": "eval"}]) is None


def test_plot_files_and_cli(tmp_path, capsys):
    run = tmp_path / "spin-x"
    run.mkdir()
    recs = steps("sft", 4) + evals(True) + [{"type": "timing", "sft": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    report.main([str(run / "metrics.jsonl"), "--plot"])
    out = capsys.readouterr().out
    assert "exact match" in out and "SFT start" in out and (run / "report.png").stat().st_size > 0
    assert (run / "report_training.png").stat().st_size > 0


def test_read_metrics_skips_a_torn_line_and_refuses_a_foreign_file(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "step", "st{"type": "resume"}\n{"type": "eval"}\n')  # killed mid-write, then resumed
    assert report.read_metrics(path) == [{"type": "eval"}]
    assert "skipped 1 line(s)" in capsys.readouterr().err
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="metrics.jsonl: line 1: not a JSON record"):
        report.read_metrics(path)
