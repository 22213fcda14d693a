using System.Text.Json;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>First contact with the real ublk driver: UBLK_U_CMD_GET_FEATURES through the managed binding.</summary>
[Trait("kernel", "7.3")]
[Trait("boot", "shared")]
public class FeatureProbeTests
{
    // Debian's 6.12 kernel: COMP_IN_TASK, NEED_GET_DATA, USER_RECOVERY, RECOVERY_REISSUE,
    // UNPRIVILEGED_DEV, CMD_IOCTL_ENCODE, USER_COPY, ZONED.
    private const ulong Features612 = 0x1fe;

    [Fact]
    public void GetFeaturesReturnsTheDriversMask()
    {
        VmEnvironment.RequireDriver();
        using var control = ControlDevice.Open();
        var features = control.GetFeatures();
        Assert.True(features.HasFlag(UblkFeatures.CmdIoctlEncode), $"features {UblkFeatureNames.Format(features)}");
        Assert.True(features.HasFlag(UblkFeatures.UringCmdCompInTask));
        if (VmEnvironment.Is612)
        {
            Assert.Equal(Features612, (ulong)features);
        }
    }

    [Fact]
    public void TheKernelIsTheOneTheHarnessWasToldToBoot()
    {
        VmEnvironment.RequireDriver();
        Assert.True(VmEnvironment.HarnessKernel is not null, "UBLKSHARP_VM_KERNEL is not set: run these tests with tools/ublksharp-vm, which exports the kernel it boots (-k)");
        Assert.StartsWith(VmEnvironment.HarnessKernel + ".", VmEnvironment.KernelRelease, StringComparison.Ordinal);
    }

    [Fact]
    public unsafe void ControlCommandsNeedAnSqe128Ring()
    {
        VmEnvironment.RequireDriver();
        var fd = Libc.OpenOrThrow(ControlDevice.Path, Libc.O_RDWR);
        try
        {
            ulong features = 0;
            var cmd = new CtrlCmd { dev_id = uint.MaxValue, queue_id = ushort.MaxValue, addr = (ulong)&features, len = 8 };
            Assert.Equal(-Errno.EINVAL, Submit(new RingOptions { Entries = 4 }, fd, cmd, withPayload: false));
            Assert.Equal(0, Submit(RingOptions.Control, fd, cmd, withPayload: true));
            Assert.Equal(Features612 & (ulong)UblkFeatures.CmdIoctlEncode, features & (ulong)UblkFeatures.CmdIoctlEncode);
        }
        finally
        {
            _ = Libc.close(fd);
        }
    }

    private static int Submit(RingOptions options, int fd, CtrlCmd cmd, bool withPayload)
    {
        using var ring = Ring.Create(options);
        // A 64-byte ring has room for 16 command bytes only; the driver must refuse it before reading more.
        ref var sqe = ref ring.GetSqe();
        if (withPayload)
        {
            sqe.PrepareUringCmdUnchecked(fd, UblkCommands.GetFeatures, cmd, 1);
        }
        else
        {
            sqe.PrepareUringCmdUnchecked(fd, UblkCommands.GetFeatures, new CmdHead { dev_id = cmd.dev_id, queue_id = cmd.queue_id, len = cmd.len, addr = cmd.addr }, 1);
        }
        ring.SubmitAndWait(1, TimeSpan.FromSeconds(10));
        Assert.True(ring.TryGetCompletion(out var cqe), "no completion within 10 s");
        return cqe.res;
    }

    private struct CmdHead
    {
        public uint dev_id;
        public ushort queue_id;
        public ushort len;
        public ulong addr;
    }

    [Fact]
    public void GetFeaturesWithAWrongLengthIsRefused()
    {
        VmEnvironment.RequireDriver();
        using var control = ControlDevice.Open();
        var output = new byte[16];
        var res = control.Execute(UblkCommands.GetFeatures, new CtrlCmd { dev_id = uint.MaxValue, queue_id = ushort.MaxValue }, default, output, TimeSpan.FromSeconds(10));
        Assert.Equal(-Errno.EINVAL, res);
    }

    [Fact]
    public void CliFeaturesPrintsTheMask()
    {
        VmEnvironment.RequireDriver();
        var (code, output) = VmEnvironment.RunCli("features --json");
        Assert.True(code == 0, output);
        using var doc = JsonDocument.Parse(output[output.IndexOf('{', StringComparison.Ordinal)..]);
        var mask = Convert.ToUInt64(doc.RootElement.GetProperty("mask").GetString(), 16);
        Assert.Contains("CMD_IOCTL_ENCODE", doc.RootElement.GetProperty("features").EnumerateArray().Select(e => e.GetString()));
        if (VmEnvironment.Is612)
        {
            Assert.Equal(Features612, mask);
        }
    }
}
