namespace UblkSharp.VmTests;

/// <summary>
/// qcow2 images that qemu-img made, served read-only through the real driver: the device reads what
/// `qemu-img convert -O raw` reads, and the ext4 inside mounts, checks clean and holds its files.
/// Written through the driver: fio crc32c verify over a backing file and ext4 on a new image, after
/// which `qemu-img check` finds the image clean and qemu reads what the device read.
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

        // `ublksharp mount` knows the image by its magic: -r mounts it read-only, and without -r it
        // is written (into the top layer); umount deletes the device, and the image checks clean.
        foreach (var (flag, mode) in new[] { ("-r ", " ro,"), ("", " rw,") })
        {
            var (code, output) = VmEnvironment.RunCli($"mount {flag}{F("top.qcow2")} {mnt}");
            try
            {
                Assert.True(code == 0, $"mount {flag}exited {code}:\n{output}");
                Sh($"cmp {mnt}/a/big.bin {F("tree/a/big.bin")}");
                Assert.Contains(mode, File.ReadAllLines("/proc/mounts").Single(l => l.Contains(mnt, StringComparison.Ordinal)), StringComparison.Ordinal);
                if (flag.Length == 0)
                {
                    Sh($"cp {F("tree/a/big.bin")} {mnt}/copy.bin");
                }
                Sh($"umount {mnt}");
                Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.DeviceIds().Length == 0, TimeSpan.FromSeconds(30)), "the device outlived the umount");
            }
            finally
            {
                CliDevices.CleanUp(mnt);
            }
        }
        Sh($"qemu-img check -q {F("top.qcow2")} && qemu-img convert -O raw {F("top.qcow2")} {F("after.raw")} && e2fsck -fn {F("after.raw")}");
        Sh($"mount -o ro,loop {F("after.raw")} {mnt} && cmp {mnt}/copy.bin {F("tree/a/big.bin")}; rc=$?; umount {mnt}; exit $rc");
    }

    [Fact]
    public void FioVerifyAndExt4WritesLeaveImagesQemuImgChecksClean()
    {
        VmEnvironment.RequireDriver();
        // An overlay over a base with data (64k clusters: fio's 512 B..1 MiB writes are mostly
        // partial clusters, copied from the base), then a new image made by --create for ext4.
        Sh($"cd {Dir} && qemu-img create -q -f qcow2 base.qcow2 96M && qemu-io -f qcow2 -c 'write -P 0x33 0 96M' base.qcow2 >/dev/null " +
           "&& qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2");
        var (id, dev) = Add($"-t qcow2 -f {F("top.qcow2")} -q 2 -d 32");
        try
        {
            var r = Fio.Run(dev, TimeSpan.FromMinutes(6), "--rw=randwrite", "--bsrange=512-1m", "--verify=crc32c", "--do_verify=1",
                "--verify_state_save=0", "--size=16M", "--offset_increment=48M");
            Fio.AssertVerified(r);
            VmEnvironment.Figure($"qcow2 writes in the guest: {r.Summary}");
            Sh($"dd if={dev} of={F("device.raw")} bs=1M iflag=direct status=none");
        }
        finally
        {
            Del(id);
        }
        Sh($"qemu-img check -q {F("top.qcow2")}");
        Sh($"qemu-img compare -q -f qcow2 -F raw {F("top.qcow2")} {F("device.raw")}");

        var mnt = F("mnt2");
        Directory.CreateDirectory(mnt);
        (id, dev) = Add($"-t qcow2 -f {F("fs.qcow2")} --create --size 64M");
        try
        {
            Sh($"mkfs.ext4 -q -F {dev} && mount {dev} {mnt} && head -c 5000000 /dev/urandom > {F("big.bin")} && cp {F("big.bin")} {mnt}/ && seq 1 100000 > {mnt}/seq.txt && umount {mnt}");
            Sh($"e2fsck -fn {dev}");
        }
        finally
        {
            CliDevices.CleanUp(mnt);
        }
        Sh($"qemu-img check -q {F("fs.qcow2")}");
        Sh($"qemu-img convert -O raw {F("fs.qcow2")} {F("fs.raw")} && e2fsck -fn {F("fs.raw")} && mount -o ro,loop {F("fs.raw")} {mnt} && cmp {mnt}/big.bin {F("big.bin")}; rc=$?; umount {mnt}; exit $rc");
    }
}
