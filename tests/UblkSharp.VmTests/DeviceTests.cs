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
}
