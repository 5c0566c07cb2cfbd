"""Re-encodes a GGUF's matrices in another tensor type with the `gguf` package (llama.cpp's own
Python implementation of the format, independent of quill's reader).

Usage: python3 gguf_convert.py SRC.gguf DST.gguf TYPE   (TYPE: F32, F16, Q8_0, Q4_0, Q4_1)
1-D tensors (norms) stay F32, as llama.cpp's converter keeps them.
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize


def main() -> None:
    src, dst, type_name = sys.argv[1], sys.argv[2], sys.argv[3]
    qtype = GGMLQuantizationType[type_name]
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        # reader shapes are GGUF order (ne0 first); numpy wants the reverse.
        data = data.reshape([int(d) for d in reversed(t.shape)])
        if data.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(t.name, data)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(t.name, data.astype(np.float16))
        else:
            q = quantize(data, qtype)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
