namespace UblkSharp.VmTests;

/// <summary>
/// qcow2 images that qemu-img made, served read-only through the real driver: the device reads what
/// `qemu-img convert -O raw` reads, and the ext4 inside mounts, checks clean and holds its files.
/// </summary>
[Trait("boot", "shared")]
public sealed class Qcow2VmTests : CowVmTest
{
    [Fact]
    public void CompressedImageOverABackingChainReadsAsQemuImgDoesAndMounts()
    {
        VmEnvironment.RequireDriver();
        // An ext4 file system with a file tree, as a raw base; a compressed 64k-cluster qcow2 copy of
        // it; and an overlay over that copy, whose writes (qemu-io, outside the file system's data)
        // land on top: three layers, the top one naming the next by a relative path.
        Sh($"mkdir -p {F("tree/a/b")} && head -c 3000000 /dev/urandom > {F("tree/a/big.bin")} && seq 1 50000 > {F("tree/a/b/seq.txt")}");
        Sh($"cd {Dir} && truncate -s 64M base.raw && mkfs.ext4 -q -F -d tree base.raw");
        Sh($"cd {Dir} && qemu-img convert -q -c -O qcow2 -o cluster_size=64k base.raw mid.qcow2 " +
           "&& qemu-img create -q -f qcow2 -o cluster_size=4k -b mid.qcow2 -F qcow2 top.qcow2 " +
           "&& qemu-io -f qcow2 -c 'write -P 0x5a 60M 1M' -c 'write -z 62M 512k' top.qcow2 >/dev/null " +
           "&& qemu-img convert -O raw top.qcow2 expected.raw");
        var (_, dev) = Add($"-t qcow2 -f {F("top.qcow2")} --read-only -q 2 -d 32");
        var mnt = F("mnt");
        Directory.CreateDirectory(mnt);
        try
        {
            Sh($"cmp {dev} {F("expected.raw")}");
            Sh($"e2fsck -fn {dev}");
            Sh($"mount -o ro {dev} {mnt}");
            Sh($"cmp {mnt}/a/big.bin {F("tree/a/big.bin")} && cmp {mnt}/a/b/seq.txt {F("tree/a/b/seq.txt")}");
            // Read-only to the block layer too: a write is refused, not lost.
            var write = VmEnvironment.Exec("dd", ["if=/dev/zero", $"of={dev}", "bs=4k", "count=1", "oflag=direct", "status=none"], TimeSpan.FromMinutes(1));
            Assert.NotEqual(0, write.ExitCode);
        }
        finally
        {
            CliDevices.CleanUp(mnt);
        }

        // `ublksharp mount` knows the image by its magic and mounts it read-only; umount deletes the device.
        var (code, output) = VmEnvironment.RunCli($"mount {F("top.qcow2")} {mnt}");
        try
        {
            Assert.True(code == 0, $"mount exited {code}:\n{output}");
            Sh($"cmp {mnt}/a/big.bin {F("tree/a/big.bin")}");
            Assert.Contains(" ro,", File.ReadAllLines("/proc/mounts").Single(l => l.Contains(mnt, StringComparison.Ordinal)), StringComparison.Ordinal);
            Sh($"umount {mnt}");
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.DeviceIds().Length == 0, TimeSpan.FromSeconds(30)), "the device outlived the umount");
        }
        finally
        {
            CliDevices.CleanUp(mnt);
        }
    }
}
