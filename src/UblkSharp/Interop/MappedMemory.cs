namespace UblkSharp.Interop;

/// <summary>An mmap'ed region; unmapped exactly once on dispose.</summary>
internal sealed unsafe class MappedMemory : IDisposable
{
    private nint _address;

    private MappedMemory(nint address, nuint length)
    {
        _address = address;
        Length = length;
    }

    public byte* Pointer => (byte*)_address;

    public nuint Length { get; }

    public static MappedMemory Map(int fd, long offset, nuint length, int prot, int flags, string what)
    {
        var addr = Libc.mmap(0, length, prot, flags, fd, offset);
        if (addr == Libc.MAP_FAILED)
        {
            var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
            throw new ErrnoException(errno, $"mmap {what} ({length} bytes at offset 0x{offset:x})",
                errno == Errno.ENOMEM ? "Check RLIMIT_MEMLOCK (ulimit -l) and free memory" : null);
        }
        return new MappedMemory(addr, length);
    }

    /// <summary>Private anonymous memory, zero-filled and committed lazily by the kernel.</summary>
    public static MappedMemory MapAnonymous(nuint length, string what)
        => Map(-1, 0, length, Libc.PROT_READ | Libc.PROT_WRITE, Libc.MAP_PRIVATE | Libc.MAP_ANONYMOUS, what);

    public void Dispose()
    {
        var addr = Interlocked.Exchange(ref _address, 0);
        if (addr != 0)
        {
            _ = Libc.munmap(addr, Length);
        }
    }
}
