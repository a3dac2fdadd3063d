#!/usr/bin/env bash
# (the workplace tool ../shared/tools/vulkan-headers.sh, kept here so that a fresh clone in CI has it)
# Vulkan headers new enough for the pinned llama.cpp (needs vk::LayerSettingEXT; Debian 12 ships 1.3.239):
# fetch Debian 13's libvulkan-dev with a separate apt state derived from the machine's own sources,
# unpack it, print the include dir. Also installs the build tools and lavapipe from Debian 12.
# usage: tools/vulkan-headers.sh [dir]  (default /tmp/vkroot) -> use -DVulkan_INCLUDE_DIR=<printed dir>
set -eu
root=${1:-/tmp/vkroot}
[ -f "$root/usr/include/vulkan/vulkan.hpp" ] && { echo "$root/usr/include"; exit 0; }
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq libvulkan-dev glslc mesa-vulkan-drivers spirv-headers glslang-tools vulkan-tools >/dev/null
st=$(mktemp -d); mkdir -p "$st/lists/partial" "$st/cache/archives/partial" "$st/etc"
sed 's/bookworm-updates//; s/bookworm-security/trixie-security/; s/bookworm/trixie/' /etc/apt/sources.list.d/debian.sources > "$st/etc/trixie.sources"
opts=(-o Dir::State="$st" -o Dir::State::Lists="$st/lists" -o Dir::Cache="$st/cache"
      -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$st/etc" -o APT::Get::List-Cleanup=0)
apt-get "${opts[@]}" update -qq >/dev/null
( cd "$st" && apt-get "${opts[@]}" download libvulkan-dev >/dev/null )
mkdir -p "$root" && dpkg -x "$st"/libvulkan-dev_*.deb "$root"
echo "$root/usr/include"
