/* fuzz_image.c — libFuzzer target for vision/image.c (vlm_img_decode: stb_image for PNG, JPEG,
 * BMP, GIF; libwebp for WebP) under ASan/UBSan. Not part of `make check`; run it with
 *   make fuzz-image && build-fuzz/fuzz_image -max_total_time=300 build-fuzz/corpus tests/data/images
 * (tests/fuzz/README.md). Every input must come back as VLM_OK with a consistent image or as an
 * error status; a crash, leak or sanitizer report is a bug in vlmd's handling of hostile images. */
#include <stdint.h>
#include <stdlib.h>

#include "vision/vision.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    vlm_img_limits lim;
    vlm_img_limits_default(&lim);
    lim.max_pixels = 4 << 20; /* keep each run fast; the limits logic is tested elsewhere */
    vlm_image img = {0};
    char err[256];
    if (vlm_img_decode(data, size, &lim, &img, err, sizeof err) == VLM_OK) {
        if (img.width <= 0 || img.height <= 0 || !img.rgb) abort();
        volatile uint8_t sink = img.rgb[(size_t)img.width * (size_t)img.height * 3 - 1];
        (void)sink;
        vlm_img_free(&img);
    }
    return 0;
}
