using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// The control features after 6.12, through the CLI and the library: resize (UPDATE_SIZE), recovery
/// fail-io, --no-partition-scan, QUIESCE and del's busy check. On a kernel that has a feature
/// (7.x) its test drives it; on 6.12 the same test asserts the fallback or the clear refusal. Each
/// test first asserts which of the two the kernel is, so a 7.3 run cannot quietly take the 6.12 path.
/// </summary>
[Trait("kernel", "7.3")]
[Trait("boot", "shared")]
public class ControlFeatureTests
{
    private const string Image = "/tmp/ublksharp-ctl7x.img";
    private const string Mnt = "/tmp/ublksharp-ctl7x-mnt";

    internal static bool Offers(UblkFeatures feature)
    {
        using var control = ControlDevice.Open();
        var offered = (control.GetFeatures() & feature) != 0;
        // 6.12 has none of these; 7.3 has them all.
        Assert.Equal(Environment.OSVersion.Version.Major >= 7, offered);
        return offered;
    }

    private static long BlockSize(string dev) => long.Parse(VmEnvironment.ShOk($"blockdev --getsize64 {dev}").Trim(), System.Globalization.CultureInfo.InvariantCulture);

    private static string Resize(uint id, string args)
    {
        var (code, output) = VmEnvironment.RunCli($"resize -n {id} {args}");
        Assert.True(code == 0, $"resize -n {id} {args} exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
        return output;
    }

    [Fact]
    public void ResizeNullMemAndLoopAndGrowAMountedExt4()
    {
        VmEnvironment.RequireDriver();
        try
        {
            var nullDev = CliDevices.Add("-t null -s 32M");
            var nullId = CliDevices.IdOf(nullDev);
            if (!Offers(UblkFeatures.UpdateSize))
            {
                Lifecycle.AssertRefused($"resize -n {nullId} 64M", "UPDATE_SIZE", "6.16");
                Assert.Equal(32L << 20, BlockSize(nullDev));
                return;
            }
            Resize(nullId, "64M");
            Assert.Equal(64L << 20, BlockSize(nullDev));
            Assert.Equal(64L << 20, CliDevices.List()[nullId].GetProperty("size").GetInt64());
            Lifecycle.AssertRefused($"resize -n {nullId} 16M", "--shrink");
            Resize(nullId, "16M --shrink");
            Assert.Equal(16L << 20, BlockSize(nullDev));

            // mem: what grows into view reads as zeros; the new end takes IO.
            var memDev = CliDevices.Add("-t mem -s 32M");
            var memId = CliDevices.IdOf(memDev);
            VmEnvironment.ShOk($"head -c 1M /dev/urandom > /tmp/ctl7x-data && dd if=/tmp/ctl7x-data of={memDev} bs=1M seek=31 oflag=direct status=none");
            Resize(memId, "16M --shrink");
            Resize(memId, "64M");
            Assert.Equal(64L << 20, BlockSize(memDev));
            Assert.Equal("0", VmEnvironment.ShOk($"dd if={memDev} bs=1M skip=31 count=1 iflag=direct status=none | tr -d '\\0' | wc -c").Trim());
            VmEnvironment.ShOk($"dd if=/tmp/ctl7x-data of={memDev} bs=1M seek=63 oflag=direct status=none && dd if={memDev} bs=1M skip=63 count=1 iflag=direct status=none | cmp - /tmp/ctl7x-data");

            // loop: the backing file grows only when asked; then ext4 grows online over it.
            Lifecycle.CreateImage(Image, 64 << 20);
            var loopDev = CliDevices.Add($"-t loop -f {Image}");
            var loopId = CliDevices.IdOf(loopDev);
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {loopDev}");
            Lifecycle.Mount(loopDev, Mnt);
            var before = long.Parse(VmEnvironment.ShOk($"df -B1 --output=size {Mnt} | tail -1").Trim(), System.Globalization.CultureInfo.InvariantCulture);
            Lifecycle.AssertRefused($"resize -n {loopId} 128M", "--grow-file");
            Assert.Equal(64L << 20, new FileInfo(Image).Length);
            Resize(loopId, "128M --grow-file");
            Assert.Equal(128L << 20, new FileInfo(Image).Length);
            Assert.Equal(128L << 20, BlockSize(loopDev));
            VmEnvironment.ShOk($"resize2fs {loopDev}", TimeSpan.FromMinutes(3));
            var after = long.Parse(VmEnvironment.ShOk($"df -B1 --output=size {Mnt} | tail -1").Trim(), System.Globalization.CultureInfo.InvariantCulture);
            Assert.True(after > before + (48L << 20), $"ext4 did not grow online: {before} -> {after} bytes");
            VmEnvironment.ShOk($"dd if=/dev/urandom of={Mnt}/big bs=1M count=80 conv=fsync status=none");
            Lifecycle.Umount(Mnt);
            VmEnvironment.ShOk($"e2fsck -f -n {loopDev}", TimeSpan.FromMinutes(3));
            VmEnvironment.Figure($"resize: null 32M->64M->16M, mem 32M->16M->64M, loop+ext4 64M->128M (df {before >> 20} -> {after >> 20} MiB)");
        }
        finally
        {
            Lifecycle.CleanUp(Mnt);
            File.Delete(Image);
        }
    }

    [Fact]
    public void RecoveryFailIoFailsIoAtOnceUntilRecovered()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 32 << 20);
        try
        {
            if (!Offers(UblkFeatures.UserRecoveryFailIo))
            {
                Lifecycle.AssertRefused($"add -t loop -f {Image} --recovery fail-io", "USER_RECOVERY_FAIL_IO", "6.13");
                Assert.Empty(VmEnvironment.DeviceIds());
                return;
            }
            var dev = CliDevices.Add($"-t loop -f {Image} --recovery fail-io");
            var id = CliDevices.IdOf(dev);
            Assert.Contains("USER_RECOVERY_FAIL_IO", CliDevices.List()[id].GetProperty("flags").GetString(), StringComparison.Ordinal);
            VmEnvironment.ShOk($"dd if=/dev/urandom of={dev} bs=1M count=4 oflag=direct status=none");
            Lifecycle.Kill9(Lifecycle.DaemonPid(id));
            Lifecycle.WaitForState(id, DeviceState.FailIo, TimeSpan.FromSeconds(30));
            // No daemon: a read fails at once (not held), and nothing hangs.
            var sw = Stopwatch.StartNew();
            var (code, output) = VmEnvironment.Sh($"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct", TimeSpan.FromSeconds(60));
            sw.Stop();
            Assert.True(code != 0, $"a read without a daemon succeeded: {output}");
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"a read without a daemon took {sw.Elapsed}");
            Lifecycle.Recover(id);
            Assert.Equal(DeviceState.Live, CliDevices.State(id));
            VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=1M count=4 iflag=direct status=none");
            VmEnvironment.Figure($"fail-io: a read with no daemon failed in {Lifecycle.Seconds(sw.Elapsed)}; after recover, IO works");
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public void NoPartitionScanLeavesThePartitionTableUnread()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 32 << 20);
        try
        {
            VmEnvironment.ShOk($"parted -s {Image} mklabel msdos mkpart primary 1MiB 100%");
            if (!Offers(UblkFeatures.NoAutoPartScan))
            {
                Lifecycle.AssertRefused($"add -t loop -f {Image} --no-partition-scan", "NO_AUTO_PART_SCAN", "7.0");
                Assert.Empty(VmEnvironment.DeviceIds());
                return;
            }
            var scanned = CliDevices.Add($"-t loop -f {Image} --read-only");
            Assert.True(VmEnvironment.WaitFor(() => File.Exists(scanned + "p1"), TimeSpan.FromSeconds(10)), $"{scanned}p1 did not appear with the scan on");
            CliDevices.Del(CliDevices.IdOf(scanned));
            var dev = CliDevices.Add($"-t loop -f {Image} --read-only --no-partition-scan");
            var id = CliDevices.IdOf(dev);
            Assert.Contains("NO_AUTO_PART_SCAN", CliDevices.List()[id].GetProperty("flags").GetString(), StringComparison.Ordinal);
            // START_DEV has returned (add waited for it): a scan would have made p1 by now.
            Assert.False(File.Exists(dev + "p1"), $"{dev}p1 exists although the scan was off");
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    [Fact]
    public void DelOfAnOpenDeviceIsBusy()
    {
        VmEnvironment.RequireDriver();
        try
        {
            var dev = CliDevices.Add("-t null -s 16M");
            var id = CliDevices.IdOf(dev);
            var safe = Offers(UblkFeatures.SafeStopDev);
            Assert.Equal(safe, CliDevices.List()[id].GetProperty("flags").GetString()!.Contains("SAFE_STOP_DEV", StringComparison.Ordinal));
            // O_EXCL, as mount holds it: busy on every kernel.
            var fd = Libc.OpenOrThrow(dev, Libc.O_RDONLY | Libc.O_EXCL | Libc.O_CLOEXEC);
            try
            {
                Lifecycle.AssertRefused($"del -n {id}", "busy");
            }
            finally
            {
                _ = Libc.close(fd);
            }
            Assert.Equal(DeviceState.Live, CliDevices.State(id));
            if (safe)
            {
                // With TRY_STOP_DEV any opener counts, not only an exclusive one.
                fd = Libc.OpenOrThrow(dev, Libc.O_RDONLY | Libc.O_CLOEXEC);
                try
                {
                    Lifecycle.AssertRefused($"del -n {id}", "busy");
                }
                finally
                {
                    _ = Libc.close(fd);
                }
                Assert.Equal(DeviceState.Live, CliDevices.State(id));
            }
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp();
        }
    }
}
