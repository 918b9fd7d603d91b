"""Run llama.cpp's own convert_hf_to_gguf.py on a test model folder, writing no vocabulary.

    python llama_cpp_convert.py CONVERTER_DIR MODEL_FOLDER --outfile FILE --outtype f32|bf16|q8_0

CONVERTER_DIR is gguf_fixtures.fetch_llama_cpp_converter()'s folder. The test folders' tokenizer
is a small byte-level BPE whose pre-tokenizer llama.cpp does not recognise (and Phi-3's converter
wants a tokenizer.model), so the model class's set_vocab is replaced by one that writes nothing:
the GGUF holds the weights and the architecture's metadata, as llama.cpp writes them, and tests
feed token ids directly.
"""

import runpy
import sys
from pathlib import Path

root = Path(sys.argv[1])
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
sys.path[:0] = [str(root), str(root / "gguf-py")]
import conversion  # noqa: E402

find = conversion.get_model_class


def without_vocabulary(name, *args, **kwargs):
    model_class = find(name, *args, **kwargs)
    model_class.set_vocab = lambda self: None  # (this process converts one folder and ends)
    return model_class


conversion.get_model_class = without_vocabulary
runpy.run_path(sys.argv[0], run_name="__main__")
