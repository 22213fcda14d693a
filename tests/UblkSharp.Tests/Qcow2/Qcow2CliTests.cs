using UblkSharp.Tests.Cli;
using UblkSharp.Tests.Cow;

namespace UblkSharp.Tests.Qcow2;

/// <summary>`ublksharp qcow2 info` and the CLI's refusals for the qcow2 target (no ublk driver needed).</summary>
public class Qcow2CliTests
{
    [Fact]
    public async Task InfoShowsHeaderChainSnapshotsAndClusters()
    {
        using var dir = new ScratchDir();
        var baseImage = Qemu.Create(dir.File("base.qcow2"), "4M", "compat=0.10");
        Qemu.RunIo(baseImage, "qcow2", "write -P 0x01 0 1M");
        var top = Qemu.Create(dir.File("top.qcow2"), "4M", "cluster_size=65536", backing: "base.qcow2");
        Qemu.RunIo(top, "qcow2", "write -P 0x02 0 128k", "write -z 1M 64k");
        Qemu.RunImg("snapshot", "-c", "before", top);
        var (code, stdout, stderr) = await CliProcess.Cli($"qcow2 info {top}");
        Assert.True(code == 0, $"qcow2 info exited {code}: {stderr}");
        Assert.Contains("version           3 (compat 1.1)", stdout, StringComparison.Ordinal);
        Assert.Contains("virtual size      4194304 bytes", stdout, StringComparison.Ordinal);
        Assert.Contains("cluster size      65536 bytes (cluster_bits 16)", stdout, StringComparison.Ordinal);
        Assert.Contains("compression type  zlib", stdout, StringComparison.Ordinal);
        Assert.Contains("refcount order    4 (16-bit refcounts)", stdout, StringComparison.Ordinal);
        Assert.Contains("extended l2       no", stdout, StringComparison.Ordinal);
        Assert.Contains("backing file      base.qcow2 (format qcow2)", stdout, StringComparison.Ordinal);
        Assert.Contains($"  1  qcow2         4194304 bytes  {baseImage}", stdout, StringComparison.Ordinal);
        Assert.Contains("snapshots         1", stdout, StringComparison.Ordinal);
        Assert.Contains("before", stdout, StringComparison.Ordinal);
        Assert.Contains("clusters          64", stdout, StringComparison.Ordinal);
        Assert.Contains("  allocated       2 (3.13%)", stdout, StringComparison.Ordinal);
        Assert.Contains("  zero            1 (1.56%)", stdout, StringComparison.Ordinal);
        Assert.Contains("  unallocated     61 (95.31%)", stdout, StringComparison.Ordinal);
    }

    [Fact]
    public async Task RefusalsAreOneLineWithoutAStackTrace()
    {
        using var dir = new ScratchDir();
        var image = Qemu.Create(dir.File("a.qcow2"), "1M", "extended_l2=on");
        var (code, _, stderr) = await CliProcess.Cli($"add -t qcow2 -f {image}");
        Assert.NotEqual(0, code);
        Assert.Contains("has extended L2 entries (subclusters), which this version writes not", stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);

        var notQcow2 = dir.RandomFile("r.img", 8192, 2);
        (code, _, stderr) = await CliProcess.Cli($"qcow2 info {notQcow2}");
        Assert.NotEqual(0, code);
        Assert.Contains("is not a qcow2 image", stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);

        (code, _, stderr) = await CliProcess.Cli($"add -t qcow2 -f {notQcow2} --read-only");
        Assert.NotEqual(0, code);
        Assert.Contains("is not a qcow2 image", stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", stderr, StringComparison.Ordinal);
    }
}
