using System.Runtime.CompilerServices;

// Every P/Invoke signature must stay blittable: no hidden marshalling on the IO path.
[assembly: DisableRuntimeMarshalling]
