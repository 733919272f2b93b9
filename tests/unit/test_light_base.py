import subprocess
import sys


def test_light_base_imports_neither_torch_nor_ray():
    # The router process imports these; it must stay free of torch and ray.
    code = ("import sys; import pdserve, pdserve.hashing, pdserve.sampling, pdserve.tokenizer, "
            "pdserve.cli, pdserve.modelgen, pdserve.checkpoint_files; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
