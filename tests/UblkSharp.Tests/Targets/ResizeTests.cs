using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

/// <summary>BlockTarget.Resize, which `ublksharp resize` calls in the daemon before (grow) or after (shrink) UPDATE_SIZE.</summary>
public class ResizeTests
{
    [Fact]
    public void NullTakesAnySize()
    {
        using var t = new NullTarget(1 << 20);
        Assert.True(t.CanResize);
        t.Resize(4 << 20, growBacking: false);
        Assert.Equal(4L << 20, t.Size);
        Assert.Equal((4L << 20).ToString(System.Globalization.CultureInfo.InvariantCulture), t.Recipe["size"]);
    }

    [Fact]
    public void MemoryGrowsIntoZerosEvenAfterAShrinkLeftDataThere()
    {
        using var t = new MemoryTarget(1 << 20);
        var data = new byte[4096];
        new Random(3).NextBytes(data);
        Assert.Equal(4096, t.Write(data, (1 << 20) - 4096));
        t.Resize(512 << 10, growBacking: false);
        Assert.Equal(512L << 10, t.Size);
        t.Resize(8 << 20, growBacking: false);
        Assert.Equal(8L << 20, t.Size);
        var back = new byte[4096];
        Assert.Equal(4096, t.Read(back, (1 << 20) - 4096));
        Assert.All(back, b => Assert.Equal(0, b));
        // The new end takes IO.
        Assert.Equal(4096, t.Write(data, (8 << 20) - 4096));
        Assert.Equal(4096, t.Read(back, (8 << 20) - 4096));
        Assert.Equal(data, back);
    }

    [Fact]
    public void MemoryRefusesSizesPastItsReservation()
    {
        using var t = new MemoryTarget(1 << 20);
        Assert.Throws<ArgumentOutOfRangeException>(() => t.Resize(MemoryTarget.GrowthReserve + 4096, growBacking: false));
        Assert.Throws<ArgumentOutOfRangeException>(() => t.Resize(1000, growBacking: false));
        Assert.Equal(1L << 20, t.Size);
    }

    [Fact]
    public void LoopGrowsItsFileOnlyWhenAskedAndNeverCutsIt()
    {
        var path = Path.Combine(Path.GetTempPath(), $"ublksharp-resize-{Guid.NewGuid():N}");
        try
        {
            using (var f = File.Create(path))
            {
                f.SetLength(1 << 20);
            }
            using var t = new LoopTarget(path);
            Assert.True(t.CanResize);
            var e = Assert.Throws<InvalidOperationException>(() => t.Resize(2 << 20, growBacking: false));
            Assert.Contains("--grow-file", e.Message, StringComparison.Ordinal);
            Assert.Equal(1L << 20, t.Size);
            t.Resize(2 << 20, growBacking: true);
            Assert.Equal(2L << 20, t.Size);
            Assert.Equal(2L << 20, new FileInfo(path).Length);
            var data = new byte[4096];
            new Random(5).NextBytes(data);
            Assert.Equal(4096, t.Write(data, (2 << 20) - 4096));
            t.Resize(1 << 20, growBacking: false);
            Assert.Equal(1L << 20, t.Size);
            Assert.Equal(2L << 20, new FileInfo(path).Length);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void ReadOnlyLoopAndTargetsWithoutResizeRefuse()
    {
        var path = Path.Combine(Path.GetTempPath(), $"ublksharp-resize-{Guid.NewGuid():N}");
        try
        {
            using (var f = File.Create(path))
            {
                f.SetLength(1 << 20);
            }
            using var t = new LoopTarget(path, readOnly: true);
            Assert.False(t.CanResize);
            Assert.Throws<NotSupportedException>(() => t.Resize(2 << 20, growBacking: true));
            Assert.Equal(1L << 20, new FileInfo(path).Length);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
