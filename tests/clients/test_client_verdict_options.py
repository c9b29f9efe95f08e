"""The leakage estimate's options (K shadows, their budget, the proxy data) are settable from every
short form of a job: the SDK's and the API's upload form, `gradleak-client submit`'s flags, and the
CI gate's policy file (a proxy file next to the policy is uploaded once and named by every job)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from clientkit import DLG, DLG_BUDGET, UPDATE_META, lenet_files, policy, write_files

from gradleak_client import tensors
from gradleak_client.audit import AuditInputs, run_audit
from gradleak_client.cli import _verdict, build_parser, main
from gradleak_client.embedded import EmbeddedService
from gradleak_client.policy import Policy, PolicyError

SHADOWS = {"when": "always", "shadows": 2, "budget": {"iterations": 3}, "seed": 4}


def proxy_bytes(n: int = 6) -> bytes:
    """Proxy images of the model's shape (photo patches), as a ground-truth upload without labels."""
    from service.data.patches import photo_patches

    images, _ = photo_patches(size=16, per_class=1)
    return tensors.to_safetensors({"images": images[:n].numpy()})


def test_the_sdk_and_the_upload_form_carry_the_verdict(service: EmbeddedService) -> None:
    files = lenet_files()
    with service.client() as client:
        model = client.models.upload(files["weights"], arch="lenet", image_shape=[3, 16, 16], num_classes=10)
        update = client.updates.upload(files["gradient"], model_id=model.id, **UPDATE_META)
        proxy = client.ground_truth.upload(io.BytesIO(proxy_bytes()))
        job = client.jobs.create(
            update_id=update.id, attack=DLG, budget=DLG_BUDGET, verdict={**SHADOWS, "proxy_data": proxy.id}
        )
        said = job.spec["verdict"]
        assert {k: said[k] for k in ("when", "shadows", "seed", "proxy_data")} == {
            "when": "always", "shadows": 2, "seed": 4, "proxy_data": proxy.id
        }  # fmt: skip
        assert said["budget"]["iterations"] == 3
        done = client.jobs.wait(job.id, timeout=120, poll_interval=0.05)
        assert done.status == "succeeded", done.error
        est = done.verdict
        assert est is not None and est.shadows_run == 2 and est.proxy_data == "uploaded proxy data"
        assert done.estimate is not None and done.estimate["budget"]["iterations"] == 3
        # the default when nothing is said: three shadows on the shipped photos
        plain = client.jobs.create(update_id=update.id, attack=DLG, budget={"iterations": 1})
        assert plain.spec["verdict"]["shadows"] == 5 and plain.spec["verdict"]["proxy_data"] is None
        # a bad option is the API's clear refusal, not a job
        with pytest.raises(Exception, match="shadows"):
            client.jobs.create(update_id=update.id, verdict={"shadows": 1})


def test_submit_flags_make_the_verdict_request() -> None:
    args = build_parser().parse_args(
        ["submit", "--update-id", "upd_x", "--shadows", "5", "--shadow-iterations", "200",
         "--proxy-data-id", "gt_abc", "--verdict", "always", "--verdict-seed", "2"]
    )  # fmt: skip
    assert _verdict(args) == {
        "when": "always",
        "shadows": 5,
        "budget": {"iterations": 200},
        "proxy_data": "gt_abc",
        "seed": 2,
    }
    assert _verdict(build_parser().parse_args(["submit", "--update-id", "upd_x"])) is None


def test_the_policy_reads_verdict_options_and_refuses_bad_ones() -> None:
    p = Policy.from_data(policy(verdict={"shadows": 4, "budget": {"iterations": 50}, "proxy_data": "p.st"}))
    assert p.verdict.request("gt_1") == {"shadows": 4, "budget": {"iterations": 50}, "proxy_data": "gt_1"}
    assert p.verdict.proxy_file(Path("/policies")) == Path("/policies/p.st")
    by_id = Policy.from_data(policy(verdict={"proxy_data": "gt_9"}))
    assert by_id.verdict.proxy_file(Path("/x")) is None and by_id.verdict.request(None) == {}
    assert Policy.from_data(policy()).verdict.request(None) == {}  # the server's defaults
    for bad, message in (({"shadows": 1}, "verdict.shadows"), ({"k": 3}, "verdict.k")):
        with pytest.raises(PolicyError, match=message):
            Policy.from_data(policy(verdict=bad))


class RecordingClient:
    """Records what the gate uploads and asks for; every job comes back as not found (an error)."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.uploaded: list[Any] = []
        outer = self

        class Uploads:
            def upload(self, file: Any, **_: Any) -> Any:
                outer.uploaded.append(file)
                return type("U", (), {"id": f"gt_{len(outer.uploaded)}"})()

        class Jobs:
            def create(self, **kw: Any) -> Any:
                outer.created.append(kw)
                raise RuntimeError("stop here")

        self.ground_truth = Uploads()
        self.jobs = Jobs()


def test_the_gate_uploads_the_proxy_data_once_and_names_it_in_every_job() -> None:
    p = Policy.from_data(
        policy(
            verdict={"shadows": 2, "budget": {"iterations": 5}, "proxy_data": "proxy.safetensors"},
            scenarios=[{"name": "a"}, {"name": "b", "defenses": [{"name": "quantize", "bits": 8}]}],
        )
    )
    fake = RecordingClient()
    inputs = AuditInputs(update_id="upd_1", proxy_data=b"proxy-bytes")
    with pytest.raises(RuntimeError, match="stop here"):
        run_audit(fake, p, inputs)  # type: ignore[arg-type]
    assert fake.uploaded == [b"proxy-bytes"]
    assert fake.created[0]["verdict"] == {"shadows": 2, "budget": {"iterations": 5}, "proxy_data": "gt_1"}
    # a file named in the policy but not given to the audit is a usage error, not a silent default
    from gradleak_client.audit import AuditUsageError

    with pytest.raises(AuditUsageError, match="proxy_data"):
        run_audit(RecordingClient(), p, AuditInputs(update_id="upd_1"))  # type: ignore[arg-type]


@pytest.mark.slow  # a second embedded service
def test_the_gate_cli_runs_the_policys_verdict_on_the_proxy_file_beside_it(tmp_path: Path) -> None:
    files = write_files(tmp_path / "inputs")
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "proxy.safetensors").write_bytes(proxy_bytes())
    path = folder / "policy.json"
    body = policy(verdict={"shadows": 2, "budget": {"iterations": 3}, "proxy_data": "proxy.safetensors"})
    body["attacks"] = [{"attack": DLG, "budget": {"iterations": 5}}]
    body["thresholds"] = [{"metric": "psnr", "max": 20}]
    path.write_text(json.dumps(body))
    data = tmp_path / "data"
    argv = [
        "audit", "--policy", str(path), "--model", str(files["weights"]), "--update", str(files["gradient"]),
        "--out", str(tmp_path / "out"), "--embedded", "--no-progress", "--data-dir", str(data),
    ]  # fmt: skip
    assert main(argv) in (0, 1)  # judged on the estimate (pass or fail), not an error
    manifests = [json.loads(m.read_text()) for m in data.rglob("metrics.json")]
    assert len(manifests) == 1
    m = manifests[0]
    assert m["metrics"] is None and m["estimate"]["shadows_run"] == 2
    assert m["estimate"]["proxy_data"] == "uploaded proxy data" and m["estimate"]["budget"]["iterations"] == 3
    junit = (tmp_path / "out" / "junit.xml").read_text()
    assert "estimated worst-case psnr" in junit


def test_the_flower_auditor_passes_its_verdict_options_to_every_job(service: EmbeddedService) -> None:
    import torch

    from gradleak_client.flower import FlowerAuditor
    from service.models import build_model
    from service.specs import DataSpec, ModelSpec

    net = build_model(ModelSpec(arch="lenet"), DataSpec(shape=(3, 16, 16), num_classes=10))
    before = [v.detach().numpy().copy() for v in net.state_dict().values()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    after = [v.detach().numpy().copy() for v in net.state_dict().values()]
    with service.client() as client:
        auditor = FlowerAuditor(
            client, arch="lenet", image_shape=(3, 16, 16), names=list(net.state_dict()), rounds=[1],
            lr=0.1, local_epochs=1, batch_size=2, normalization="none", budget={"iterations": 1},
            verdict={"when": "never", "shadows": 4},
        )  # fmt: skip
        record = auditor.observe(before, after, 2, {"server-round": 1})
        assert record is not None and record.job_id is not None, record
        said = client.jobs.get(record.job_id).spec["verdict"]
        assert said["when"] == "never" and said["shadows"] == 4
