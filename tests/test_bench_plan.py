"""`mfm bench plan` runs end to end on a small synthetic manifest, S3 first batch included
(figures are the benchmark's business; this checks it reports them)."""

from pipeline.benchmarks.plan import cli, synthetic_manifest


def test_synthetic_manifest_has_the_asked_shape():
    m = synthetic_manifest(1_281_167, 1024)
    counts = [s["samples"] for s in m["shards"]]
    assert len(counts) == 1024 and sum(counts) == m["num_samples"] == 1_281_167 and max(counts) - min(counts) <= 1


def test_bench_plan_reports_every_figure(s3_endpoint, capsys):
    assert cli(["--samples", "20000", "--shards", "16", "--world", "8", "--workers", "2", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    for line in ("manifest load (local)", "epoch plan, one rank", "after a layout change", "two sources"):
        assert line in out
    assert "first batch from moto S3" in out and "x one GET of its shard" in out
    assert "goal < 2 s and < 200 MB per rank: met" in out and "20,000 samples x" in out
