// Fake CUDA for a CPU-only PyTorch build: lets FakeTensorMode run CUDA code (forward AND autograd backward)
// at the level of shapes, dtypes, devices and op schemas, with no GPU and no CUDA library.
//
// A CPU-only build has no device guard for CUDA (slicing, .contiguous(), copy_ and .to("cuda") of a fake CUDA
// tensor abort with "PyTorch is not linked with support for cuda devices") and its CUDA hooks say "no CUDA",
// so at::getAccelerator() is empty and the autograd engine cannot pick a stream for a CUDA node. This library
// registers c10's own FakeGuardImpl for CUDA and hooks that report one CUDA device whose init does nothing.
// The hooks are read once, the first time anything asks (during `import torch`), so the library must be
// loaded before torch: seqpar.fake_cuda starts Python with it in LD_PRELOAD. Nothing here allocates device
// memory; a real (non-fake) CUDA tensor still fails, as it should.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {

c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> fake_cuda_guard;

struct FakeCUDAHooks : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex current_device() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};

struct Install {
  Install() {
    c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)].store(&fake_cuda_guard);
  }
} install;

}  // namespace

namespace at::detail {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks);
}  // namespace at::detail

extern "C" int seqpar_fake_cuda_installed() { return 1; }
