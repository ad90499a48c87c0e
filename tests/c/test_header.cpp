// Compiled by tests/c_api.rs with `c++ -std=c++11 -Wall -Wextra -Werror -pedantic`: the header must
// be valid, warning-free C++ with C linkage for every declaration.
#include "xsam.h"

#include <type_traits>

static_assert(std::is_same<decltype(&xsam_version), const char * (*)()>::value, "xsam_version");
static_assert(sizeof(xsam_model_params) > 0 && sizeof(xsam_request_params) > 0, "complete types");

int main() {
    xsam_model_params mp = xsam_model_default_params();
    xsam_request_params rp = xsam_request_default_params();
    return (mp.device == XSAM_DEVICE_CPU && rp.task == XSAM_TASK_CONVERSATION) ? 0 : 1;
}
