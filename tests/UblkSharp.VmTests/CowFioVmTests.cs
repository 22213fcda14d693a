namespace UblkSharp.VmTests;

/// <summary>fio crc32c verify on a cow device over random data; the merge equals what the device read.</summary>
[Trait("kernel", "7.3")]
[Trait("boot", "shared")]
public sealed class CowFioVmTests : CowVmTest
{
    [Fact]
    public void FioCrc32cVerifyAndTheMergeIsWhatTheDeviceRead()
    {
        VmEnvironment.RequireDriver();
        const long size = 96L << 20;
        var baseImg = RandomFile("base.img", size, 17);
        var over = F("over.cow");
        var (id, dev) = Add($"-t cow -f {over} --create --backing {baseImg} --io ring -q 2 -d 32");
        try
        {
            // Two jobs (one per queue, as the kernel maps them by CPU), qd32 each, mixed block sizes, on disjoint 32M regions.
            var fio = Sh($"fio --name=cowverify --filename={dev} --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=2 " +
                "--size=32M --offset_increment=48M --rw=randwrite --bssplit=512/10:4k/40:16k/20:64k/20:256k/10 --blockalign=512 " +
                "--verify=crc32c --verify_fatal=1 --do_verify=1 --randseed=7 --group_reporting", 900);
            Assert.Contains("cowverify", fio, StringComparison.Ordinal);
            Assert.DoesNotContain("verify: bad", fio, StringComparison.Ordinal);
            Sh($"dd if={dev} of={F("device.img")} bs=1M iflag=direct status=none");
        }
        finally
        {
            Del(id);
        }
        var (code, output) = VmEnvironment.RunCli($"cow merge {over} --into {F("merged.img")}");
        Assert.True(code == 0, output);
        Sh($"cmp {F("device.img")} {F("merged.img")}");

        // What fio did not touch is the base, byte for byte; what it touched is the device's.
        var merged = File.ReadAllBytes(F("merged.img"));
        var baseBytes = File.ReadAllBytes(baseImg);
        Assert.Equal(size, merged.Length);
        foreach (var (from, to) in new[] { (32L << 20, 48L << 20), (80L << 20, 96L << 20) })
        {
            Assert.True(merged.AsSpan((int)from, (int)(to - from)).SequenceEqual(baseBytes.AsSpan((int)from, (int)(to - from))), $"{from}..{to} changed");
        }
        Assert.False(merged.AsSpan(0, 32 << 20).SequenceEqual(baseBytes.AsSpan(0, 32 << 20)));
        if (File.Exists("/usr/bin/uml_moo"))
        {
            Sh($"uml_moo {over} {F("moo.img")} && cmp {F("moo.img")} {F("merged.img")}");
        }
    }

}
