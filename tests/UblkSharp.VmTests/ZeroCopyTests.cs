using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// Zero copy (AUTO_BUF_REG, Linux 6.16+): the driver installs each request's pages in the queue
/// ring's buffer table and the loop target's READ_FIXED/WRITE_FIXED move them. On 7.3 every case runs
/// zero copy (checked: requests served so, none fell back); on 6.12 the same commands fall back to
/// copying and pass, and `--zero-copy on` is refused with the reason.
/// </summary>
[Trait("kernel", "7.3")]
public class ZeroCopyTests
{
    private const string Image = "/tmp/ublksharp-zc.img";

    internal static bool BatchOffered
    {
        get
        {
            using var control = ControlDevice.Open();
            return (control.GetFeatures() & UblkFeatures.BatchIo) != 0;
        }
    }

    private static bool Offered
    {
        get
        {
            using var control = ControlDevice.Open();
            return (control.GetFeatures() & UblkFeatures.AutoBufReg) != 0;
        }
    }

    /// <summary>
    /// crc32c write-then-verify with 512 B to 1 MiB blocks, through a device in this process (so its
    /// queues' counters can be read), on a file served on the ring, a file opened O_DIRECT, and a
    /// block device (the kernel loop driver over a file), each with zero copy on and off.
    /// </summary>
    [Theory]
    [InlineData("file", true, true)]
    [InlineData("file", true, false)]
    [InlineData("file", false, true)]
    [InlineData("file", false, false)]
    [InlineData("direct", true, true)]
    [InlineData("direct", false, false)]
    [InlineData("blockdev", true, true)]
    [InlineData("blockdev", true, false)]
    [InlineData("blockdev", false, true)]
    public void FioVerifyPassesWithAndWithoutZeroCopy(string backing, bool zeroCopy, bool batch)
    {
        VmEnvironment.RequireDriver();
        using (var f = File.Create(Image))
        {
            f.SetLength(128 << 20);
        }
        string? loopDev = null;
        try
        {
            var path = Image;
            if (backing == "blockdev")
            {
                loopDev = VmEnvironment.ShOk($"losetup -f --show {Image}").Trim();
                path = loopDev;
            }
            Exception? fatal = null;
            using (var target = new LoopTarget(path, directIo: backing == "direct", io: LoopIo.Ring))
            using (var device = UblkDevice.Create(target, new DeviceOptions
            {
                Queues = 2,
                Depth = 64,
                MaxIoBytes = 1 << 20,
                ZeroCopy = zeroCopy ? ZeroCopyMode.Auto : ZeroCopyMode.Off,
                Batch = batch ? BatchMode.Auto : BatchMode.Off,
            }, e => fatal = e))
            {
                var usesZeroCopy = (device.Info.flags & (ulong)UblkFeatures.AutoBufReg) != 0;
                Assert.Equal(zeroCopy && Offered, usesZeroCopy);
                var usesBatch = (device.Info.flags & (ulong)UblkFeatures.BatchIo) != 0;
                Assert.Equal(batch && BatchOffered, usesBatch);
                var r = Fio.Run(device.BlockPath, TimeSpan.FromMinutes(4), "--rw=randwrite", "--bsrange=512-1m", "--verify=crc32c",
                    "--do_verify=1", "--verify_state_save=0", "--size=24M", "--offset_increment=24M");
                Fio.AssertVerified(r);
                Assert.Null(fatal);
                Assert.Equal(0, device.Errors);
                var (served, fellBack) = Counters(device);
                VmEnvironment.Log($"{backing}, zero copy {(usesZeroCopy ? "on" : "off")}, batch {(usesBatch ? "on" : "off")}: {served} requests zero copy, {fellBack} fell back; {r.Summary}");
                Assert.Equal(0, fellBack);
                Assert.Equal(0, BatchCommitFailures(device));
                if (usesZeroCopy)
                {
                    Assert.True(served >= r.TotalIos, $"only {served} of fio's {r.TotalIos} IOs went zero copy");
                }
                else
                {
                    Assert.Equal(0, served);
                }
            }
        }
        finally
        {
            if (loopDev is not null)
            {
                VmEnvironment.Sh($"losetup -d {loopDev}");
            }
            File.Delete(Image);
        }
    }

    /// <summary>ext4 on a zero-copy loop device (CLI daemon): a file tree written, unmounted, a clean forced e2fsck, and the data read back after a remount.</summary>
    [Fact]
    public void Ext4OnAZeroCopyDeviceChecksClean()
    {
        VmEnvironment.RequireDriver();
        const string mnt = "/tmp/ublksharp-zc-mnt";
        using (var f = File.Create(Image))
        {
            f.SetLength(256 << 20);
        }
        Directory.CreateDirectory(mnt);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} --io ring --zero-copy auto -q 2");
            var row = CliDevices.List()[CliDevices.IdOf(dev)];
            Assert.Equal(Offered ? "zero-copy" : "copy", row.GetProperty("data").GetString());
            Assert.Equal(BatchOffered, row.GetProperty("batch").GetBoolean());
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {dev} && mount {dev} {mnt} && mkdir -p {mnt}/a/b && " +
                $"head -c 20000000 /dev/urandom > {mnt}/a/big && seq 1 100000 > {mnt}/a/b/seq && cp -r /usr/share/doc/fio {mnt}/doc && " +
                $"sha256sum {mnt}/a/big {mnt}/a/b/seq > /tmp/ublksharp-zc.sums && umount {mnt}", TimeSpan.FromMinutes(3));
            var (code, output) = VmEnvironment.Sh($"e2fsck -fn {dev}", TimeSpan.FromMinutes(2));
            Assert.True(code == 0, $"e2fsck -fn exited {code}:\n{output}");
            VmEnvironment.ShOk($"echo 3 > /proc/sys/vm/drop_caches; mount {dev} {mnt} && sha256sum -c /tmp/ublksharp-zc.sums && umount {mnt}", TimeSpan.FromMinutes(2));
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp(mnt);
            File.Delete(Image);
            File.Delete("/tmp/ublksharp-zc.sums");
        }
    }

    /// <summary>
    /// What zero copy cannot serve is refused up front: `--zero-copy on` for a target that needs the
    /// bytes (mem), for a loop file served through its mapping (tmpfs without --io ring), and, on a
    /// kernel without AUTO_BUF_REG, at all; no device is left behind.
    /// </summary>
    [Fact]
    public void ZeroCopyOnIsRefusedWhereItCannotBeHad()
    {
        VmEnvironment.RequireDriver();
        using (var f = File.Create(Image))
        {
            f.SetLength(16 << 20);
        }
        try
        {
            var (code, output) = VmEnvironment.RunCli("add -t mem --size 16M --zero-copy on");
            Assert.True(code != 0 && output.Contains("mem target", StringComparison.Ordinal) && !output.Contains("   at ", StringComparison.Ordinal),
                $"mem with --zero-copy on: exit {code}:\n{output}");
            (code, output) = VmEnvironment.RunCli($"add -t loop -f {Image} --zero-copy on");
            Assert.True(code != 0 && output.Contains("--io ring", StringComparison.Ordinal), $"loop on tmpfs with --zero-copy on: exit {code}:\n{output}");
            (code, output) = VmEnvironment.RunCli($"add -t loop -f {Image} --zero-copy sometimes");
            Assert.True(code != 0 && output.Contains("auto, on, off or explicit", StringComparison.Ordinal), $"--zero-copy sometimes: exit {code}:\n{output}");
            (code, output) = VmEnvironment.RunCli($"add -t loop -f {Image} --io ring --zero-copy on");
            if (Offered)
            {
                Assert.True(code == 0, $"loop --io ring --zero-copy on: exit {code}:\n{output}");
                var id = VmEnvironment.DeviceIds().Single();
                Assert.Equal("zero-copy", CliDevices.List()[id].GetProperty("data").GetString());
                CliDevices.Del(id);
            }
            else
            {
                Assert.True(code != 0 && output.Contains("AUTO_BUF_REG", StringComparison.Ordinal), $"--zero-copy on without AUTO_BUF_REG: exit {code}:\n{output}");
            }
            // SUPPORT_ZERO_COPY's explicit registration, asked for by name: taken where offered
            // (7.3 offers both), refused with the kernel it needs where not (6.12).
            (code, output) = VmEnvironment.RunCli($"add -t loop -f {Image} --io ring --zero-copy explicit");
            if (ControlFeatureTests.Offers(UblkFeatures.SupportZeroCopy))
            {
                Assert.True(code == 0, $"loop --io ring --zero-copy explicit: exit {code}:\n{output}");
                var id = VmEnvironment.DeviceIds().Single();
                var row = CliDevices.List()[id];
                Assert.Equal("zero-copy", row.GetProperty("data").GetString());
                var flags = row.GetProperty("flags").GetString();
                Assert.True(flags!.Contains("SUPPORT_ZERO_COPY", StringComparison.Ordinal) && !flags.Contains("AUTO_BUF_REG", StringComparison.Ordinal), flags);
                var data = new byte[64 << 10];
                new Random(5).NextBytes(data);
                DirectIo.Write($"/dev/ublkb{id}", 1 << 20, data);
                Assert.Equal(data, DirectIo.Read($"/dev/ublkb{id}", 1 << 20, data.Length));
                CliDevices.Del(id);
            }
            else
            {
                Assert.True(code != 0 && output.Contains("SUPPORT_ZERO_COPY", StringComparison.Ordinal) && !output.Contains("   at ", StringComparison.Ordinal),
                    $"--zero-copy explicit without SUPPORT_ZERO_COPY: exit {code}:\n{output}");
            }
            Assert.Empty(VmEnvironment.DeviceIds());
        }
        finally
        {
            CliDevices.CleanUp();
            File.Delete(Image);
        }
    }

    /// <summary>
    /// `--batch on` where batched IO cannot be had is refused before a device exists: at depth 1,
    /// and on a kernel without BATCH_IO; where it can, `list` says so. (With --recovery it is had:
    /// RecoveryTests and UpgradeTests serve batched devices.)
    /// </summary>
    [Fact]
    public void BatchOnIsRefusedWhereItCannotBeHad()
    {
        VmEnvironment.RequireDriver();
        try
        {
            var (code, output) = VmEnvironment.RunCli("add -t null --size 16M --batch on -d 1");
            Assert.True(code != 0 && output.Contains("depth 1", StringComparison.Ordinal), $"--batch on -d 1: exit {code}:\n{output}");
            (code, output) = VmEnvironment.RunCli("add -t null --size 16M --batch maybe");
            Assert.True(code != 0 && output.Contains("auto, on or off", StringComparison.Ordinal), $"--batch maybe: exit {code}:\n{output}");
            Assert.Empty(VmEnvironment.DeviceIds());
            (code, output) = VmEnvironment.RunCli("add -t null --size 16M --batch on");
            if (BatchOffered)
            {
                Assert.True(code == 0, $"--batch on: exit {code}:\n{output}");
                var id = VmEnvironment.DeviceIds().Single();
                Assert.True(CliDevices.List()[id].GetProperty("batch").GetBoolean(), "list does not show the device as batched");
                var r = Fio.Run($"/dev/ublkb{id}", TimeSpan.FromMinutes(2), "--rw=randread", "--bs=4k", "--size=8M", "--io_size=16M");
                Assert.True(r.ExitCode == 0 && r.Error == 0 && r.ReadIos >= 4096, $"fio on the batched null device: {r}");
                CliDevices.Del(id);
            }
            else
            {
                Assert.True(code != 0 && output.Contains("BATCH_IO", StringComparison.Ordinal), $"--batch on without BATCH_IO: exit {code}:\n{output}");
            }
            Assert.Empty(VmEnvironment.DeviceIds());
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    /// <summary>
    /// A backend IO that fails under zero copy fails that one request, and the device serves on: a
    /// file on a 16 MiB tmpfs behind a 64 MiB device runs out of space (ENOSPC), then reads of what
    /// was written, and of a file truncated behind the device's back (the tail past its end reads as
    /// zeros, written into the request through USER_COPY), still work.
    /// </summary>
    [Fact]
    public void AFailedZeroCopyWriteFailsOnlyItsRequest()
    {
        VmEnvironment.RequireDriver();
        const string small = "/tmp/ublksharp-zc-small";
        Directory.CreateDirectory(small);
        VmEnvironment.ShOk($"mount -t tmpfs -o size=16M ublksharp-zc {small}");
        var file = $"{small}/disk.img";
        try
        {
            using (var f = File.Create(file))
            {
                f.SetLength(64 << 20);
            }
            Exception? fatal = null;
            using var target = new LoopTarget(file, io: LoopIo.Ring);
            using var device = UblkDevice.Create(target, new DeviceOptions { Queues = 1, Depth = 16 }, e => fatal = e);
            var data = new byte[1 << 20];
            Random.Shared.NextBytes(data);
            DirectIo.Write(device.BlockPath, 0, data);
            var pattern = new byte[64 << 10];
            Random.Shared.NextBytes(pattern);
            DirectIo.Write(device.BlockPath, 1 << 20, pattern);
            // 32 MiB into a file system of 16: the writes that find no space fail, and only those.
            var (code, output) = VmEnvironment.Sh($"dd if=/dev/urandom of={device.BlockPath} bs=1M count=32 seek=2 oflag=direct", TimeSpan.FromMinutes(2));
            Assert.True(code != 0 && (output.Contains("No space left", StringComparison.Ordinal) || output.Contains("Input/output error", StringComparison.Ordinal)),
                $"dd past the space left exited {code}:\n{output}");
            Assert.True(device.Errors > 0, "no request failed");
            Assert.Null(fatal);
            Assert.Equal(data, DirectIo.Read(device.BlockPath, 0, data.Length));

            // Cut the file to 2 KiB into the pattern behind the device's back: the rest of a read there
            // must be zeros. dd reads the first MiB's last 64 KiB (random) and then the pattern's block
            // into one buffer, so a tail left unwritten would show the first block's bytes.
            VmEnvironment.ShOk($"truncate -s {(1 << 20) + 2048} {file}");
            VmEnvironment.ShOk($"dd if={device.BlockPath} of=/tmp/ublksharp-zc.out bs=64K skip=15 count=2 iflag=direct status=none");
            var back = File.ReadAllBytes("/tmp/ublksharp-zc.out");
            File.Delete("/tmp/ublksharp-zc.out");
            Assert.Equal(128 << 10, back.Length);
            Assert.Equal(data.AsSpan(15 << 16, 64 << 10).ToArray(), back.AsSpan(0, 64 << 10).ToArray());
            Assert.Equal(pattern.AsSpan(0, 2048).ToArray(), back.AsSpan(64 << 10, 2048).ToArray());
            Assert.True(back.AsSpan((64 << 10) + 2048).IndexOfAnyExcept((byte)0) < 0, "past the file's new end, a read returned non-zero bytes");
            Assert.Equal(data.AsSpan(0, 1 << 20).ToArray(), DirectIo.Read(device.BlockPath, 0, 1 << 20));
            Assert.Null(fatal);
            Assert.Equal(DeviceState.Live, CliDevices.State(device.Id));
            var (served, fellBack) = Counters(device);
            VmEnvironment.Log($"{device.Errors} requests failed; {served} zero copy, {fellBack} fell back; {output.Trim()}");
            Assert.Equal(0, fellBack);
        }
        finally
        {
            VmEnvironment.Sh($"umount -l {small}");
        }
    }

    /// <summary>
    /// The cow target under zero copy: what is written goes to the COW file and reads back, the rest
    /// reads from the backing file, and past the end of a backing file cut short behind the device's
    /// back a read gets zeros (READ_FIXED from /dev/zero into the request's pages), all zero copy.
    /// </summary>
    [Fact]
    public void ACowDeviceServesZeroCopyAndReadsZerosPastItsBackingFilesEnd()
    {
        VmEnvironment.RequireDriver();
        var backing = Image + ".base";
        var overlay = Image + ".cow";
        var baseData = new byte[8 << 20];
        Random.Shared.NextBytes(baseData);
        File.WriteAllBytes(backing, baseData);
        try
        {
            Exception? fatal = null;
            using var target = TargetFactory.Create("cow", new Dictionary<string, string> { ["file"] = overlay, ["backing"] = backing, ["create"] = "on", ["io"] = "ring" });
            using var device = UblkDevice.Create(target, new DeviceOptions { Queues = 1, Depth = 16, ZeroCopy = ZeroCopyMode.Auto }, e => fatal = e);
            Assert.Equal(Offered, (device.Info.flags & (ulong)UblkFeatures.AutoBufReg) != 0);
            var written = new byte[64 << 10];
            Random.Shared.NextBytes(written);
            DirectIo.Write(device.BlockPath, 1 << 20, written);
            var expected = baseData.AsSpan(0, 2 << 20).ToArray();
            written.CopyTo(expected, 1 << 20);
            Assert.Equal(expected, DirectIo.Read(device.BlockPath, 0, 2 << 20));

            // Cut the backing file at 4 MiB + 2 KiB: 128 KiB read from 4 MiB - 64 KiB has 62 KiB of zeros at its end.
            VmEnvironment.ShOk($"truncate -s {(4 << 20) + 2048} {backing}");
            var back = DirectIo.Read(device.BlockPath, (4 << 20) - (64 << 10), 128 << 10);
            Assert.Equal(baseData.AsSpan((4 << 20) - (64 << 10), (64 << 10) + 2048).ToArray(), back.AsSpan(0, (64 << 10) + 2048).ToArray());
            Assert.True(back.AsSpan((64 << 10) + 2048).IndexOfAnyExcept((byte)0) < 0, "past the backing file's new end, a read returned non-zero bytes");
            Assert.Null(fatal);
            Assert.Equal(0, device.Errors);
            var (served, fellBack) = Counters(device);
            VmEnvironment.Log($"cow: {served} requests zero copy, {fellBack} fell back");
            Assert.Equal(0, fellBack);
            Assert.True(!Offered || served >= 3, $"only {served} requests went zero copy");
        }
        finally
        {
            File.Delete(backing);
            File.Delete(overlay);
        }
    }

    /// <summary>Requests the device's queues served zero copy, and those that fell back to copying.</summary>
    internal static (long Served, long FellBack) Counters(UblkDevice device)
    {
        var queues = device.Queues;
        return (queues.Sum(q => q.ZeroCopyRequests), queues.Sum(q => q.ZeroCopyFallbacks));
    }

    private static long BatchCommitFailures(UblkDevice device) => device.Queues.Sum(q => q.BatchCommitFailures);
}
