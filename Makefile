# Makefile — builds the one `vlmd` binary, the unit tests and the benches.
#
#   make              release build (-O2, -Wall -Wextra -Werror) into build/
#   make SANITIZE=1   ASan+UBSan build into build-san/
#   make CUDA=1       also compiles runtime/cuda/*.cu with nvcc (sm_80, sm_90) and links cuBLAS/NCCL
#   make test         builds, then runs every test through tests/run.sh (prints "N passed, N failed")
#   make unit         unit tests only (what the sanitizer build runs)
#
# Sources are picked up by wildcard per layer, so adding a file needs no Makefile edit.

SANITIZE ?= 0
CUDA     ?= 0
CC       ?= gcc
NVCC     ?= nvcc

ifeq ($(SANITIZE),1)
BUILD    ?= build-san
OPTFLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
LDSAN    := -fsanitize=address,undefined
else
BUILD    ?= build
OPTFLAGS := -O2 -g
LDSAN    :=
endif

PKGS     := libmicrohttpd libcjson libpcre2-8 libutf8proc libwebp libcurl libjpeg
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

# OpenBLAS is used for large f32 GEMMs (prefill, vision); found through pkg-config when present.
BLAS_OK  := $(shell pkg-config --exists openblas && echo 1 || echo 0)
ifeq ($(BLAS_OK),1)
BLAS_CFLAGS := -DVLM_HAVE_OPENBLAS $(shell pkg-config --cflags openblas)
BLAS_LIBS   := $(shell pkg-config --libs openblas)
BLAS_DESC   := openblas $(shell pkg-config --modversion openblas)
else
BLAS_DESC   := none (built-in kernels only)
endif

CFLAGS_COMMON := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -fopenmp -pthread \
                 -I. $(PKG_CFLAGS) $(BLAS_CFLAGS)
CFLAGS   ?=
CFLAGS   += $(OPTFLAGS) $(CFLAGS_COMMON)
LDLIBS   := $(PKG_LIBS) $(BLAS_LIBS) -lm -fopenmp -pthread $(LDSAN)

CUDA_DESC := off (make CUDA=1 to build runtime/cuda)
CU_SRC    :=
ifeq ($(CUDA),1)
CUDA_HOME ?= /usr/local/cuda
CU_SRC    := $(wildcard runtime/cuda/*.cu)
CUDA_ARCH := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NVFLAGS   := -O2 -std=c++17 $(CUDA_ARCH) -I. -MMD -MP -Xcompiler -Wall,-Wextra,-fPIC
CFLAGS    += -DVLM_HAVE_CUDA -I$(CUDA_HOME)/include
LDLIBS    += -L$(CUDA_HOME)/lib64 -lcudart -lcublas -lcublasLt -lnccl -lstdc++
# engine.c refers to the backend's entry points only weakly, which never pulls an archive member in:
# -u makes the linker take runtime/cuda/backend_cuda.cu.o from libvlmd.a
LDLIBS    += -Wl,-u,vlm_backend_cuda_create
CUDA_DESC := on ($(shell $(NVCC) --version | tail -n 2 | head -n 1); sm_80 sm_90)
endif

LIB_SRC  := $(wildcard tokenizer/*.c runtime/*.c vision/*.c server/*.c)
LIB_SRC  := $(filter-out server/main.c,$(LIB_SRC))
LIB_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(LIB_SRC)) $(patsubst %.cu,$(BUILD)/%.cu.o,$(CU_SRC))
TEST_SRC := $(wildcard tests/unit/test_*.c)
TEST_BIN := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(TEST_SRC))
BENCH_SRC:= $(wildcard bench/*.c)
ifneq ($(CUDA),1)
BENCH_SRC:= $(filter-out bench/gpu.c,$(BENCH_SRC)) # the GPU bench exists only in CUDA=1 builds
endif
BENCH_BIN:= $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_SRC))

.PHONY: fuzz-image all info test unit check bench clean
all: info $(BUILD)/vlmd $(TEST_BIN) $(BENCH_BIN)

info:
	@echo "vlmd build: dir=$(BUILD) cc=$$($(CC) -dumpfullversion) sanitize=$(SANITIZE)"
	@echo "  blas:   $(BLAS_DESC)"
	@echo "  cuda:   $(CUDA_DESC)"
	@echo "  deps:   $(PKGS)$(if $(PKG_LIBS),, [pkg-config found none: run .ci/run or install the -dev packages])"

$(BUILD)/libvlmd.a: $(LIB_OBJ)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

$(BUILD)/vlmd: $(BUILD)/server/main.o $(BUILD)/libvlmd.a
	$(CC) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/unit/%.c tests/unit/test.h $(BUILD)/libvlmd.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libvlmd.a $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libvlmd.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -O3 -o $@ $< $(BUILD)/libvlmd.a $(LDLIBS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c -o $@ $<

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c -o $@ $<

unit: all
	BUILD=$(BUILD) bash tests/run.sh unit

test: all
	BUILD=$(BUILD) bash tests/run.sh all

# What CI runs: release build (unit + integration) and the ASan/UBSan build of the unit tests,
# summed into one "N passed, N failed" line.
check:
	$(MAKE) --no-print-directory all
	$(MAKE) --no-print-directory SANITIZE=1 all
	bash tests/run.sh check

# libFuzzer target for image decoding (tests/fuzz/README.md); needs clang, not part of check.
fuzz-image:
	mkdir -p build-fuzz
	clang -g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined \
	    -fno-sanitize=pointer-overflow,nonnull-attribute -fno-sanitize-recover=undefined -I. $(PKG_CFLAGS) \
	    tests/fuzz/fuzz_image.c vision/image.c $(PKG_LIBS) -lm -o build-fuzz/fuzz_image

clean:
	rm -rf build build-san build-cuda build-fuzz

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
