using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

public class NullTargetTests
{
    [Fact]
    public void DescribesItself()
    {
        using var t = new NullTarget(1L << 40);
        Assert.Equal(1L << 40, t.Size);
        Assert.Equal("null", t.Kind);
        Assert.Equal("1099511627776", t.Recipe["size"]);
        Assert.False(t.IsReadOnly);
        Assert.True(t.CanDiscard);
        Assert.True(t.CanWriteZeroes);
        Assert.False(t.HasVolatileCache);
        Assert.Null(t.CreateUringBackend(0));
    }

    [Fact]
    public void ReadsReturnZerosWhateverTheBufferHeld()
    {
        // A buffer comes back from a shared pool (NBD) or a tag's last request (ublk): none of it may leak.
        using var t = new NullTarget(1 << 20);
        var b = new byte[8192];
        Array.Fill(b, (byte)0x77);
        Assert.Equal(8192, t.Read(b, 4096));
        Assert.All(b, x => Assert.Equal(0, x));
        Assert.Equal(0, t.Read([], 0));
    }

    [Fact]
    public void WritesAndEverythingElseSucceedAndKeepNothing()
    {
        using var t = new NullTarget(1 << 20);
        var data = new byte[4096];
        Array.Fill(data, (byte)0xab);
        Assert.Equal(4096, t.Write(data, 0));
        Assert.Equal(4096, t.WriteFua(data, 512));
        Assert.Equal(0, t.Flush());
        Assert.Equal(0, t.Discard(0, 1 << 20));
        Assert.Equal(0, t.WriteZeroes(0, 1 << 20, mayUnmap: false));
        Assert.Equal(0, t.WriteZeroes(0, 1 << 20, mayUnmap: true));

        var back = new byte[4096];
        Assert.Equal(4096, t.Read(back, 0));
        Assert.All(back, x => Assert.Equal(0, x)); // the written data was not kept
    }
}
