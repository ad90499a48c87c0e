// Emulation shim: host-side stand-ins for the CUDA types and intrinsics the kernels use.
#pragma once
#include "emu.h"
