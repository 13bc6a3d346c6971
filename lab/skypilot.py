"""Cloud fan-out: a SkyPilot task file whose nodes start Ray workers in the harness's pinned
image; the lab provisions nothing itself (`lab skypilot`, then `lab run --executor ray`)."""

from __future__ import annotations

from .errors import LabError
from .executors import SLOT_RESOURCE
from .harness import Harness


def skypilot_task(harness: Harness, accelerators: str = "H200:1", nodes: int = 2, port: int = 6379,
                  image: str | None = None) -> str:
    """A SkyPilot task (YAML) whose nodes start Ray workers in the harness's pinned image; the lab
    provisions nothing itself. `lab run --executor ray --address HEAD:PORT` then uses them."""
    from .publish import resolve_image

    image = image or resolve_image(harness) or harness.environment.image
    if not image:
        raise LabError(f"{harness.name} has no published image: run `lab publish {harness.name} --registry R` "
                       "first (or give --image), so that every worker runs the same pinned environment")
    gpu = harness.environment.needs_gpu
    resources = f'"{{\\"{SLOT_RESOURCE}\\": 1}}"' if not gpu else ""
    start = "--num-gpus=$SKYPILOT_NUM_GPUS_PER_NODE" if gpu else f"--num-cpus=2 --resources={resources}"
    return f"""\
# SkyPilot task: Ray workers for the lab harness '{harness.name}' (written by `lab skypilot`).
#   sky launch -c lab-{harness.name} {harness.name}.sky.yaml
#   lab run {harness.name} --executor ray --address <head IP>:{port}
# The lab and every worker must see the harness and the run folder at the same paths
# (docs/scaling.md: a shared filesystem); mount one at the same path on the lab's machine.
name: lab-{harness.name}-workers
num_nodes: {nodes}
resources:
  accelerators: {accelerators if gpu else "null"}
  image_id: docker:{image}
  ports: {port}
setup: |
  python -c "import lab, ray" || pip install 'ray>=2.9'
run: |
  head=$(echo "$SKYPILOT_NODE_IPS" | head -n1)
  if [ "$SKYPILOT_NODE_RANK" = "0" ]; then
    ray start --head --port={port} --disable-usage-stats --include-dashboard=false {start}
  else
    sleep 10
    ray start --address="$head:{port}" --disable-usage-stats {start}
  fi
  sleep infinity
"""
