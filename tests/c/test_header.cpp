// The C API from C++, driven by tests/c_api.rs:
//
//     test_header MODEL_DIR IMAGE_PNG
//
// Compiled with `c++ -std=c++11 -Wall -Wextra -Werror -pedantic` and linked to libxsam: the header
// must be valid, warning-free C++ with C linkage for every declaration, and usable with RAII
// handles. Loads the model, opens a session on the PNG's bytes, runs a referring and a panoptic
// request and prints `result NAME JSON` for each (the Rust side checks them against the Rust API),
// then frees everything, checking each free.
#include "xsam.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

static_assert(std::is_same<decltype(&xsam_version), const char * (*)()>::value, "xsam_version");
static_assert(sizeof(xsam_model_params) > 0 && sizeof(xsam_request_params) > 0, "complete types");

namespace {

[[noreturn]] void die(const char * what) {
    std::fprintf(stderr, "%s failed: %s\n", what, xsam_last_error());
    std::exit(1);
}

void check(int32_t rc, const char * what) {
    if (rc != XSAM_OK) {
        die(what);
    }
}

struct Free {
    void operator()(xsam_model * m) const { check(xsam_model_free(m), "xsam_model_free"); }
    void operator()(xsam_session * s) const { check(xsam_session_free(s), "xsam_session_free"); }
    void operator()(xsam_result * r) const { check(xsam_result_free(r), "xsam_result_free"); }
};

using Model = std::unique_ptr<xsam_model, Free>;
using Session = std::unique_ptr<xsam_session, Free>;
using Result = std::unique_ptr<xsam_result, Free>;

Result run(xsam_session * s, const xsam_request_params & p) {
    xsam_result * r = nullptr;
    check(xsam_session_run(s, p, &r), "xsam_session_run");
    return Result(r);
}

std::string json(const xsam_result * r) {
    size_t need = 0;
    if (xsam_result_json(r, nullptr, 0, &need) != XSAM_BUFFER_TOO_SMALL || need < 2) {
        die("xsam_result_json (size)");
    }
    std::string s(need, '\0');
    check(xsam_result_json(r, &s[0], s.size(), nullptr), "xsam_result_json");
    s.resize(need - 1);
    return s;
}

}  // namespace

int main(int argc, char ** argv) {
    xsam_model_params mp = xsam_model_default_params();
    xsam_request_params rp = xsam_request_default_params();
    if (mp.device != XSAM_DEVICE_CPU || rp.task != XSAM_TASK_CONVERSATION) {
        return 1;
    }
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s MODEL_DIR IMAGE_PNG\n", argv[0]);
        return 2;
    }
    std::ifstream f(argv[2], std::ios::binary);
    std::vector<uint8_t> png((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (png.empty()) {
        return 2;
    }

    xsam_model * m = nullptr;
    check(xsam_model_load(argv[1], mp, &m), "xsam_model_load");
    Model model(m);
    xsam_session * s = nullptr;
    check(xsam_session_from_image(model.get(), png.data(), png.size(), &s), "xsam_session_from_image");
    Session session(s);

    rp.task = XSAM_TASK_REFERRING;
    rp.text = "the red square";
    rp.forced = true;
    Result referring = run(session.get(), rp);
    std::printf("result referring %s\n", json(referring.get()).c_str());

    const char * classes[] = {"square", "disc"};
    const char * stuff[] = {"background"};
    rp = xsam_request_default_params();
    rp.task = XSAM_TASK_PANOPTIC;
    rp.classes = classes;
    rp.n_classes = 2;
    rp.stuff = stuff;
    rp.n_stuff = 1;
    rp.forced = true;
    rp.threshold = 0.0;
    Result panoptic = run(session.get(), rp);
    std::printf("result panoptic %s\n", json(panoptic.get()).c_str());

    // results may outlive their session and model; free in the opposite order to show it
    session.reset();
    model.reset();
    referring.reset();
    panoptic.reset();
    std::printf("ok\n");
    return 0;
}
