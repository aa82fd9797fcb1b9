# Sourced by the device-call scripts (gpu_session.sh, gpu_breastmnist.sh) from the repository
# root: the binary as $B (the carried dist/omnirad.xz, else a local build) and the CubeCL kernel
# cache in dist/kernels, carried in as dist/kernels.tar.xz and brought back as $OUT/kernels.tar.xz.
if [ -f dist/omnirad.xz ]; then
  B=/tmp/omnirad-gpu
  xz -dc dist/omnirad.xz > $B && chmod +x $B
else
  B=${OMNIRAD:-./target/release/omnirad}
fi
export OMNIRAD_KERNEL_CACHE=$PWD/dist/kernels
unpack_kernels() {
  if [ -f dist/kernels.tar.xz ]; then
    mkdir -p dist/kernels && tar -xJf dist/kernels.tar.xz -C dist/kernels
  fi
}
pack_kernels() {
  [ -d dist/kernels ] && tar -cJf "$OUT/kernels.tar.xz" -C dist/kernels . || true
}
