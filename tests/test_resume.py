"""Runs outlive their kernel: a real kernel training the embedded model is SIGKILLed between checkpoints, a new
kernel carries the run on with `%%qlora_train --resume`, and every step after the resume point has the loss
an uninterrupted run has, and the same final adapter."""

import json
import os
import queue
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "qlora_magic" / "examples" / "word_forms.jsonl"
SETUP = f"""
%load_ext qlora_magic
import json
from qlora_magic import get_session
rows = [json.loads(line) for line in open({str(DATA)!r})][:48]
import torch
torch.manual_seed(0)  # the LoRA initialisation: the same in the killed kernel and the uninterrupted one
"""
TRAIN = """%%qlora_train --max-steps 7 --eval-steps 3 --output-dir {out} --display none --lr 1e-3 --seed 3
data: $rows
prompt: "Instruction: {{instruction}}\\n\\nResponse: "
response: "{{response}}"
eval_split: 4
batch_size: 2
grad_accum: 2
max_length: 64
"""
REPORT = """
import torch
history = get_session().history
weights = {name: p.detach().float().flatten()[:64].tolist() for name, p in get_session().model.named_parameters() if p.requires_grad}
print("RESULT" + json.dumps({"history": history, "weights": weights}))
"""


class Kernel:
    """A real IPython kernel (jupyter_client), fed cells one at a time."""

    def __init__(self):
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(ROOT))

    def run(self, code: str, timeout: float = 600, wait: bool = True) -> str:
        msg_id = self.client.execute(code)
        return self.output(msg_id, timeout) if wait else msg_id

    def output(self, msg_id, timeout: float = 600) -> str:
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise AssertionError(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                reply = self.client.get_shell_msg(timeout=10)["content"]
                assert reply["status"] == "ok", f"the cell failed: {''.join(out)[-2000:]}"
                return "".join(out)
        raise AssertionError(f"the cell ran past {timeout} s; output so far: {''.join(out)[-2000:]}")

    def result(self) -> dict:
        text = self.run(REPORT)
        return json.loads(text.split("RESULT", 1)[1])

    def kill(self):
        os.kill(self.manager.provisioner.process.pid, signal.SIGKILL)
        self.close()

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _wait_for(condition, timeout=600, what="it"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout} s for {what}")


def _logged_steps(out: Path) -> int:
    rows = []
    for history in out.glob("*/history.jsonl"):
        rows += [json.loads(line) for line in history.read_text().splitlines() if line.strip().endswith("}")]
    return max((row["step"] for row in rows if "loss" in row), default=0)


def _losses(history, key="loss"):
    return {row["step"]: row[key] for row in history if row.get(key) is not None}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    kernel = Kernel()
    try:
        kernel.run(SETUP + "\n%qlora_load")
        kernel.run(TRAIN.format(out=out))
        return kernel.result()
    finally:
        kernel.close()


def test_a_killed_kernel_resumes_to_the_same_losses_and_adapter(tmp_path, uninterrupted):
    out = tmp_path / "runs"
    first = Kernel()
    try:
        first.run(SETUP + "\n%qlora_load")
        first.run(TRAIN.format(out=out), wait=False)
        # Killed after the checkpoint of step 3 (an evaluation) and before the one of step 6.
        _wait_for(lambda: _logged_steps(out) >= 4, what="step 4 to be logged")
    finally:
        first.kill()
    (run,) = out.iterdir()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    assert json.loads((run / "run.json").read_text())["status"] == "running"  # as the kill left it

    second = Kernel()
    try:
        second.run("%load_ext qlora_magic\nfrom qlora_magic import get_session\nimport json")
        runs_text = second.run("from qlora_magic.engine.run_folder import RunFolder\n"
                               f"print(RunFolder({str(run)!r}).status())")
        assert runs_text.strip() == "crashed"
        # A new kernel: no model loaded, no data variable; the run folder has both.
        second.run(f"%qlora_train --resume --output-dir {out} --display none")
        resumed = second.result()
    finally:
        second.close()

    whole_losses, resumed_losses = _losses(uninterrupted["history"]), _losses(resumed["history"])
    assert sorted(resumed_losses) == list(range(1, 8))  # steps 1-3 from before the kill, 4-7 trained again
    for step in range(4, 8):
        assert resumed_losses[step] == pytest.approx(whole_losses[step], rel=1e-4), step
    assert _losses(resumed["history"], "eval_loss") == pytest.approx(_losses(uninterrupted["history"], "eval_loss"), rel=1e-4)
    assert resumed["weights"].keys() == uninterrupted["weights"].keys()
    for name, values in uninterrupted["weights"].items():
        assert resumed["weights"][name] == pytest.approx(values, rel=1e-3, abs=1e-6), name
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["steps_done"] == 7
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 8))  # no step twice
