using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;

namespace UblkSharp.VmTests;

/// <summary>
/// O_DIRECT reads and writes of a block device from this process, so that every byte goes through
/// the ublk server and none is answered from the page cache (.NET has no O_DIRECT option on Linux).
/// </summary>
internal static unsafe class DirectIo
{
    public static void Write(string device, long offset, ReadOnlySpan<byte> data)
    {
        using var handle = Open(device, Libc.O_RDWR);
        using var buffer = new AlignedBuffer(data.Length);
        data.CopyTo(buffer.Span);
        RandomAccess.Write(handle, buffer.Span, offset);
    }

    public static byte[] Read(string device, long offset, int length)
    {
        using var handle = Open(device, Libc.O_RDONLY);
        using var buffer = new AlignedBuffer(length);
        var done = 0;
        while (done < length)
        {
            var n = RandomAccess.Read(handle, buffer.Span[done..], offset + done);
            Assert.True(n > 0, $"{device}: read at {offset + done} returned {n}");
            done += n;
        }
        return buffer.Span.ToArray();
    }

    private static SafeFileHandle Open(string device, int flags) => new(Libc.OpenOrThrow(device, flags | Libc.O_DIRECT), ownsHandle: true);

    private sealed class AlignedBuffer : IDisposable
    {
        private readonly byte* _p;
        private readonly int _length;

        public AlignedBuffer(int length)
        {
            Assert.True(length > 0 && length % 512 == 0, $"O_DIRECT lengths must be whole sectors, not {length}");
            _length = length;
            _p = (byte*)NativeMemory.AlignedAlloc((nuint)length, 4096);
        }

        public Span<byte> Span => new(_p, _length);

        public void Dispose() => NativeMemory.AlignedFree(_p);
    }
}
