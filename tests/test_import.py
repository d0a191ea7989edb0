"""`import cvzoo` (and hubconf) stay light; a missing optional package names the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("timm", "kornia", "open_clip", "diffusers", "faiss")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_import_cvzoo_is_light():
    assert _imported_after("import cvzoo") == []


def test_the_zoo_and_hubconf_are_light():
    assert _imported_after("import cvzoo.zoo, cvzoo.backbones, cvzoo.necks, cvzoo.heads, hubconf") == []


def test_the_probe_sees_heavy_imports():  # the check above can fail: importing timm is seen
    assert _imported_after("import cvzoo.zoo; cvzoo.zoo.create_model('timm_resnet18')") == ["timm"]


def test_missing_timm_names_the_extra():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "from cvzoo.zoo import create_model\n"
        "try:\n    create_model('timm_resnet18')\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "pip install 'cvzoo[timm]'" in out.stdout


def test_lazy_subpackages():
    import cvzoo

    assert cvzoo.necks.FPN.__name__ == "FPN"
    assert cvzoo.detection.RetinaNet.__name__ == "RetinaNet"
    assert cvzoo.__version__
