// A program built only from the UblkSharp package (PackageTests and PackagedToolTests build it
// against a local feed): a RAM disk in one small class, served as a ublk device or over NBD.
// Usage: PackageConsumer ublk | nbd unix:///PATH. Prints the device path or "listening", then
// serves until stdin closes.
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Runtime;
using UblkSharp.Targets;

var disk = new RamDisk(64 << 20);
using IDisposable server = args[0] == "nbd"
    ? NbdServer.Start(NbdAddress.ParseListen(args[1]), new NbdExport("", disk))
    : UblkDevice.Create(disk, new DeviceOptions());
Console.WriteLine(server is UblkDevice device ? device.BlockPath : "listening");
Console.In.ReadToEnd();

// The whole target: a byte array, read and written at the offsets the kernel asks for.
sealed class RamDisk(int size) : BlockTarget
{
    private readonly byte[] _data = new byte[size];
    public override long Size => _data.Length;
    public override string Kind => "ramdisk";
    public override int Read(Span<byte> buffer, long offset)
    {
        _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer);
        return buffer.Length;
    }
    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        data.CopyTo(_data.AsSpan((int)offset));
        return data.Length;
    }
}
