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

    public void Dispose()
    {
        var addr = Interlocked.Exchange(ref _address, 0);
        if (addr != 0)
        {
            _ = Libc.munmap(addr, Length);
        }
    }
}
