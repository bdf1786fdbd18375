// kvtuner-edge: the tensor-core decode kernel for quantized K/V, head size 256 (one file per head size
// so that the instances compile in parallel)
#include "fattn-mmaq.cuh"

FATTN_MMAQ_GET_CASE(256)
