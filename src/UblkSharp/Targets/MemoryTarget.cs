using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.Targets;

/// <summary>A RAM disk: anonymous memory, allocated lazily by the kernel as it is written.</summary>
public sealed unsafe class MemoryTarget : BlockTarget
{
    private readonly MappedMemory _memory;

    public MemoryTarget(long size)
    {
        if (size <= 0 || size % 4096 != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size), "The size must be a positive multiple of 4096 bytes");
        }
        _size = size;
        // Address space for growth (resize), committed only as it is written; where the kernel
        // refuses a reservation that large (strict overcommit), the device cannot grow.
        try
        {
            _memory = MappedMemory.Map(-1, 0, (nuint)Math.Max(size, GrowthReserve), Libc.PROT_READ | Libc.PROT_WRITE,
                Libc.MAP_PRIVATE | Libc.MAP_ANONYMOUS | Libc.MAP_NORESERVE, "memory target");
        }
        catch (ErrnoException)
        {
            _memory = MappedMemory.MapAnonymous((nuint)size, "memory target");
        }
    }

    /// <summary>The largest size a memory device can grow to.</summary>
    public const long GrowthReserve = 1L << 40;

    private long _size;

    public override long Size => Volatile.Read(ref _size);

    public override bool CanResize => true;

    public override void Resize(long newSize, bool growBacking)
    {
        if (newSize <= 0 || newSize % 4096 != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(newSize), "The size must be a positive multiple of 4096 bytes");
        }
        if ((ulong)newSize > _memory.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(newSize), $"a memory device can grow to {_memory.Length} bytes here, not {newSize}");
        }
        var old = Size;
        if (newSize > old)
        {
            // What grows into view reads as zeros, whatever a shrink left there.
            ZeroAndRelease(old, newSize - old);
        }
        Volatile.Write(ref _size, newSize);
    }

    public override string Kind => "mem";

    public override IReadOnlyDictionary<string, string> Recipe => new Dictionary<string, string> { ["size"] = Size.ToString(System.Globalization.CultureInfo.InvariantCulture) };

    public override int Read(Span<byte> buffer, long offset)
    {
        new ReadOnlySpan<byte>(_memory.Pointer + offset, buffer.Length).CopyTo(buffer);
        return buffer.Length;
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        data.CopyTo(new Span<byte>(_memory.Pointer + offset, data.Length));
        return data.Length;
    }

    public override int Discard(long offset, long length)
    {
        // Give whole pages back to the kernel; zero the partial edges so discarded data reads as zeros.
        ZeroAndRelease(offset, length);
        return 0;
    }

    public override int WriteZeroes(long offset, long length, bool mayUnmap)
    {
        ZeroAndRelease(offset, length);
        return 0;
    }

    private void ZeroAndRelease(long offset, long length)
    {
        var start = (offset + 4095) & ~4095L;
        var end = (offset + length) & ~4095L;
        if (end > start)
        {
            new Span<byte>(_memory.Pointer + offset, (int)(start - offset)).Clear();
            new Span<byte>(_memory.Pointer + end, (int)(offset + length - end)).Clear();
            _ = Libc.madvise((nint)(_memory.Pointer + start), (nuint)(end - start), Libc.MADV_DONTNEED);
        }
        else
        {
            NativeMemory.Clear(_memory.Pointer + offset, (nuint)length);
        }
    }

    protected override void Dispose(bool disposing)
    {
        _memory.Dispose();
        base.Dispose(disposing);
    }
}
