// ATen's vectors at the width this build targets (-march=native): ATen picks its vector code by
// these macros, which torch's own build sets per kernel file and an extension must set itself.
#pragma once
#if defined(__AVX512F__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
