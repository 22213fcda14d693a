using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.VmTests;

/// <summary>Devices served in this process, driven through /dev/ublkbN.</summary>
[Trait("boot", "shared")]
public class DeviceTests
{
    [Fact]
    public void MemoryDeviceRoundTrip()
    {
        VmEnvironment.RequireDriver();
        using var device = UblkDevice.Create(new MemoryTarget(64 << 20), new DeviceOptions { Queues = 2, Depth = 32 });
        Assert.True(File.Exists(device.BlockPath));
        var data = new byte[1 << 20];
        new Random(7).NextBytes(data);
        using (var fs = new FileStream(device.BlockPath, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite, 1, FileOptions.WriteThrough))
        {
            fs.Position = 3 << 20;
            fs.Write(data);
            fs.Flush(true);
        }
        var back = new byte[data.Length];
        using (var fs = new FileStream(device.BlockPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1))
        {
            fs.Position = 3 << 20;
            fs.ReadExactly(back);
        }
        Assert.Equal(data, back);
        Assert.Equal(0, device.Errors);
    }

    [Fact]
    public void NullDeviceReadsZerosThroughABufferThatCarriedWrites()
    {
        VmEnvironment.RequireDriver();
        // Depth 1: every request goes through tag 0's one buffer, so each read comes right after
        // writes that left their bytes in it (the runtime keeps it zeroed for a null target's reads).
        using var device = UblkDevice.Create(new NullTarget(64 << 20), new DeviceOptions { Queues = 1, Depth = 1 });
        var data = new byte[256 << 10];
        new Random(11).NextBytes(data);
        foreach (var (write, read) in new[] { (4096, 4096), (256 << 10, 4096), (4096, 256 << 10), (256 << 10, 256 << 10), (8192, 128 << 10) })
        {
            DirectIo.Write(device.BlockPath, 1 << 20, data.AsSpan(0, write));
            var back = DirectIo.Read(device.BlockPath, 1 << 20, read);
            var first = Array.FindIndex(back, b => b != 0);
            Assert.True(first < 0, $"after a {write}-byte write, a {read}-byte read has a non-zero byte at {first}");
        }
        Assert.Equal(0, device.Errors);
    }
}
